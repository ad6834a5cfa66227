"""Write the bundled LLaVA demo data: small pictures of coloured shapes, and questions about them in English and Chinese.

Each picture is one shape (circle, square, triangle) in one colour (red, green, blue, yellow) on a light
background, drawn at a few sizes and positions, 56 x 56 pixels (the tiny CLIP tower's input size). The rows use
the tutorial's LLaVA format (``{"id", "image", "conversation": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", ...}]}``); a colour question can only be answered by looking at the picture, which is what the
fine-tune has to learn. ``captions.json`` holds one caption per picture: the stage-1 (projector pretraining)
data of ``data/tiny_llava.py``. ``general.json`` is a small text-only set (rows without an image) to mix in.
Same code, same files: nothing is random but a seeded ``random.Random``.

Run: python data/build_llava_data.py  (rewrites data/llava_demo/ deterministically)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "llava_demo"
SIZE = 56
COLOURS = {  # name: (RGB, Chinese)
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 40), "绿色"),
    "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((235, 200, 20), "黄色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
VARIANTS = 4  # pictures per colour and shape
QUESTIONS = [  # (language, kind, question)
    ("en", "colour", "What colour is the shape?"),
    ("en", "shape", "What shape is in the picture?"),
    ("en", "describe", "Describe the picture."),
    ("zh", "colour", "图中的形状是什么颜色？"),
    ("zh", "shape", "图中是什么形状？"),
    ("zh", "describe", "描述这张图片。"),
]
GENERAL = [
    ("What colour is the sky on a clear day?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("How many sides does a square have?", "A square has four sides."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("Is a circle round?", "Yes, a circle is round."),
    ("What colour is a ripe banana?", "A ripe banana is yellow."),
    ("What colour is a ripe tomato?", "A ripe tomato is red."),
    ("晴天的天空是什么颜色？", "天空是蓝色。"),
    ("草是什么颜色？", "草是绿色。"),
    ("正方形有几条边？", "正方形有四条边。"),
    ("三角形有几条边？", "三角形有三条边。"),
    ("圆形是圆的吗？", "是的，圆形是圆的。"),
    ("熟香蕉是什么颜色？", "熟香蕉是黄色。"),
    ("熟番茄是什么颜色？", "熟番茄是红色。"),
]


def answer(kind: str, lang: str, colour: str, shape: str) -> str:
    zh_colour, zh_shape = COLOURS[colour][1], SHAPES[shape]
    if lang == "en":
        return {"colour": f"It is {colour}.", "shape": f"It is a {shape}.", "describe": f"A {colour} {shape}."}[kind]
    return {"colour": f"是{zh_colour}。", "shape": f"是{zh_shape}。", "describe": f"一个{zh_colour}的{zh_shape}。"}[
        kind
    ]


def draw(colour: str, shape: str, rng: random.Random):
    from PIL import Image, ImageDraw

    background = tuple(235 + rng.randrange(15) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    r = rng.randrange(12, 20)
    cx, cy = rng.randrange(r + 2, SIZE - r - 2), rng.randrange(r + 2, SIZE - r - 2)
    fill = COLOURS[colour][0]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def build(out: Path = OUT, seed: int = 0) -> None:
    rng = random.Random(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows, captions = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for v in range(VARIANTS):
                name = f"{colour}_{shape}_{v}.png"
                draw(colour, shape, rng).save(out / "img" / name, optimize=True)
                captions.append({"id": f"cap-{name}", "image": name, "conversation": [
                    {"from": "human", "value": "<image>"}, {"from": "gpt", "value": answer("describe", "en", colour, shape)}]})  # fmt: skip
                # two questions per picture, one per language, of different kinds
                kinds = rng.sample(["colour", "shape", "describe"], 2)
                for lang, kind in zip(("en", "zh"), kinds, strict=True):
                    question = next(q for la, k, q in QUESTIONS if la == lang and k == kind)
                    rows.append({"id": f"{name}-{lang}-{kind}", "image": name, "conversation": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer(kind, lang, colour, shape)}]})  # fmt: skip
    general = [
        {"id": f"general-{i}", "conversation": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        for i, (q, a) in enumerate(GENERAL)
    ]
    for name, data in (("task.json", rows), ("captions.json", captions), ("general.json", general)):
        lines = ",\n".join(json.dumps(row, ensure_ascii=False) for row in data)
        (out / name).write_text(f"[\n{lines}\n]\n", encoding="utf-8")  # a JSON list, one row a line


if __name__ == "__main__":
    build()
    print(f"LLaVA demo data written to {OUT}")
