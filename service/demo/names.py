"""Name and address pools for demo people, and a generator that draws from them.

Data, not logic: the tuples below are what to edit to make the demo look different. Given
names come in two generations (born before 1975 / from 1975) because a 80-year-old called
"子轩" or a child called "建国" looks wrong to a Chinese reader.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Common family names, most frequent first, with a rough relative weight.
FAMILY_NAMES: tuple[tuple[str, int], ...] = (
    ("王", 10), ("李", 10), ("张", 9), ("刘", 7), ("陈", 6), ("杨", 5), ("赵", 4), ("黄", 3),
    ("周", 3), ("吴", 3), ("徐", 2), ("孙", 2), ("胡", 2), ("朱", 2), ("高", 2), ("林", 1),
    ("何", 1), ("郭", 2), ("马", 1), ("罗", 1), ("梁", 1), ("宋", 1), ("郑", 1), ("韩", 1),
    ("冯", 1), ("武", 2), ("贾", 1), ("薛", 1), ("田", 1), ("欧阳", 1),
)

GIVEN_MALE_OLDER: tuple[str, ...] = (
    "建国", "国强", "志刚", "建军", "卫东", "德明", "振华", "文斌", "永庆", "树林",
    "长青", "福海", "明亮", "保平", "俊", "勇", "军", "平", "海", "斌",
)
GIVEN_FEMALE_OLDER: tuple[str, ...] = (
    "秀英", "桂兰", "玉珍", "淑芬", "凤英", "秀兰", "丽华", "翠花", "春梅", "素梅",
    "红梅", "玉兰", "金凤", "爱华", "霞", "芳", "敏", "静", "萍", "燕",
)
GIVEN_MALE_YOUNGER: tuple[str, ...] = (
    "浩然", "子轩", "宇航", "俊杰", "博文", "嘉豪", "晨阳", "天佑", "明哲", "一鸣",
    "思远", "泽宇", "磊", "鹏", "涛", "超", "晨", "昊", "凯", "杰",
)
GIVEN_FEMALE_YOUNGER: tuple[str, ...] = (
    "欣怡", "梓涵", "雨桐", "思琪", "诗涵", "佳怡", "梦瑶", "婉婷", "晓雯", "若曦",
    "可馨", "雅琴", "婷", "丹", "琳", "倩", "璐", "洁", "颖", "悦",
)

#: The two digits after the leading "1" of Chinese mobile numbers in common use.
MOBILE_PREFIXES: tuple[str, ...] = ("30", "35", "37", "38", "39", "52", "58", "59", "80", "86", "87", "89")

GENERATION_SPLIT_YEAR = 1975


@dataclass(frozen=True)
class PersonName:
    family: str
    given: str

    @property
    def text(self) -> str:
        """Chinese order, no space: family name first."""
        return self.family + self.given


class NameGenerator:
    """Draws names, mobile numbers and the like from one ``random.Random`` without repeats,
    so a seed yields the same people every time and no two demo people share a name."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._names: set[str] = set()
        self._phones: set[str] = set()
        self._families = [f for f, _ in FAMILY_NAMES]
        self._weights = [w for _, w in FAMILY_NAMES]

    def name(self, sex: str, birth_year: int) -> PersonName:
        older = birth_year < GENERATION_SPLIT_YEAR
        pool = {
            ("male", True): GIVEN_MALE_OLDER, ("female", True): GIVEN_FEMALE_OLDER,
            ("male", False): GIVEN_MALE_YOUNGER, ("female", False): GIVEN_FEMALE_YOUNGER,
        }[(sex, older)]
        for _ in range(1000):
            candidate = PersonName(self.rng.choices(self._families, self._weights)[0], self.rng.choice(pool))
            if candidate.text not in self._names:
                self._names.add(candidate.text)
                return candidate
        raise RuntimeError("name pools exhausted; add names to service/demo/names.py")

    def mobile(self) -> str:
        while True:
            phone = "1" + self.rng.choice(MOBILE_PREFIXES) + f"{self.rng.randrange(10**8):08d}"
            if phone not in self._phones:
                self._phones.add(phone)
                return phone

    def landline(self, area_code: str) -> str:
        while True:
            phone = f"{area_code}-{self.rng.randrange(2_000_000, 9_999_999)}"
            if phone not in self._phones:
                self._phones.add(phone)
                return phone
