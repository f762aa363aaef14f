"""Chinese arithmetic word problems with their answers, generated deterministically from a seed."""

from __future__ import annotations

import random

NAMES = ["小明", "小红", "小刚", "小丽", "妈妈", "爸爸", "老师", "小华"]
THINGS = [("苹果", "个"), ("铅笔", "支"), ("书", "本"), ("糖", "颗"), ("花", "朵"), ("鱼", "条"), ("球", "个")]
_ADD = [
    "{n}有{a}{u}{t}，又买了{b}{u}，现在一共有多少{u}{t}？",
    "{n}第一天看了{a}{u}{t}，第二天看了{b}{u}，两天一共看了多少{u}？",
    "盒子里有{a}{u}{t}，{n}又放进去{b}{u}，盒子里现在有多少{u}？",
]
_SUB = ["{n}有{a}{u}{t}，送给同学{b}{u}，还剩多少{u}？", "树上有{a}{u}{t}，{n}摘走了{b}{u}，树上还有多少{u}？"]


def make_problem(rng: random.Random, max_number: int = 9) -> dict:
    """One problem: {"question", "answer" (a number), "solution" ("a+b=c，答：c")}."""
    name, (thing, unit) = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, max_number), rng.randint(1, max_number)
    if rng.random() < 0.5:
        template, op, answer = rng.choice(_ADD), "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        template, op, answer = rng.choice(_SUB), "-", a - b
    question = template.format(n=name, a=a, b=b, u=unit, t=thing)
    return {"question": question, "answer": answer, "solution": f"{a}{op}{b}={answer}，答：{answer}"}


def make_problems(count: int, seed: int, max_number: int = 9) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, max_number) for _ in range(count)]
