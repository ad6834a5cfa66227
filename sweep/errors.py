"""The one error a user fixes by editing their input; ``sweep.cli`` turns it into exit code 2."""


class SpecError(ValueError):
    """A spec, data file or model directory that cannot be used; the message says where and why."""
