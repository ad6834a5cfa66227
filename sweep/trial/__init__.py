"""The trial room: one trial from its files to its record, and the contract with its training process."""
