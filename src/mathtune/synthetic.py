"""Generated grade-school word problems in GSM8K's exact format.

GSM8K itself cannot ship with the offline demo, and a model may have memorised it; freshly
sampled problems of the same kinds serve both needs. Each template draws names, objects and
numbers from a seeded ``random.Random`` so that every intermediate result is a positive
integer, writes a question and a step-by-step solution with ``<<expression=result>>``
calculator annotations, and every problem is re-checked before it is returned.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, NoReturn

from mathtune.answers import ANNOTATION_RE, safe_eval

__all__ = ["TEMPLATES", "Template", "generate", "parse_id"]


@dataclass(frozen=True)
class Template:
    """One kind of problem: its name, its kind (rates, percent, ...) and its number of solution lines."""

    name: str
    kind: str
    steps: int
    build: Callable[[random.Random], tuple[str, "_Solution"]]


TEMPLATES: list[Template] = []


def _template(kind: str, steps: int):
    """Register a template function under its own name."""

    def register(build):
        TEMPLATES.append(Template(build.__name__, kind, steps, build))
        return build

    return register


class _Resample(Exception):
    """The sampled numbers break a template's constraint (a remainder, a negative count): draw again."""


def _need(condition: bool) -> None:
    if not condition:
        raise _Resample


def _div(a: int, b: int) -> int:
    """Exact division, or resample: a solution line never shows a remainder."""
    _need(b > 0 and a % b == 0)
    return a // b


def _pct(value: int, percent: int) -> int:
    return _div(value * percent, 100)


class _Solution:
    """Solution lines in GSM8K style: the arithmetic in words, then its calculator annotation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.answer: int | None = None

    def step(self, text: str, expr: str, value: int, after: str = "", money: bool = False) -> int:
        """Add '{text} 4 * 5 = <<4*5=20>>20{after}.' and return value, which the template computed itself."""
        shown = re.sub(r"([-+*/])", r" \1 ", expr)
        dollar = "$" if money else ""
        self.lines.append(f"{text} {shown} = {dollar}<<{expr}={value}>>{value}{after}.")
        self.answer = value
        return value


@dataclass(frozen=True)
class _Person:
    name: str
    they: str
    their: str

    @property
    def They(self) -> str:  # noqa: N802 - reads like the sentence it starts
        return self.they.capitalize()


_NAMES = {
    "she": ["Amara", "Bianca", "Chloe", "Dalia", "Esme", "Farah", "Greta", "Hana", "Ines", "Jasmine",
            "Keiko", "Lucia", "Maya", "Nadia", "Olivia", "Priya", "Rosa", "Sofia", "Tamsin", "Yara"],
    "he": ["Arjun", "Bruno", "Caleb", "Dmitri", "Elias", "Felix", "Gabriel", "Hugo", "Ivan", "Jonah",
           "Kofi", "Leo", "Mateo", "Nikhil", "Omar", "Pablo", "Rafael", "Samir", "Tobias", "Wes"],
}
_POOL = [_Person(name, they, "her" if they == "she" else "his") for they, names in _NAMES.items() for name in names]
_TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}


def _person(rng: random.Random) -> _Person:
    return rng.choice(_POOL)


def _people(rng: random.Random, k: int) -> list[_Person]:
    """k people with different names."""
    return rng.sample(_POOL, k)


@_template("rates", 2)
def hourly_wage(rng):
    p = _person(rng)
    job = rng.choice(["walking dogs", "tutoring", "washing cars", "shelving library books", "bagging groceries"])
    rate, hours, days = rng.randint(8, 25), rng.randint(2, 8), rng.randint(3, 6)
    question = (f"{p.name} earns ${rate} an hour {job}. This week {p.they} works {hours} hours a day for "
                f"{days} days. How much money does {p.name} earn this week?")
    s = _Solution()
    daily = s.step(f"Each day {p.name} earns", f"{rate}*{hours}", rate * hours, money=True)
    s.step(f"Over {days} days {p.they} earns", f"{daily}*{days}", daily * days, money=True)
    return question, s


@_template("comparison", 2)
def age_gap(rng):
    child, elder = _people(rng, 2)
    role = rng.choice(["neighbor", "music teacher", "swimming coach", "piano teacher"])
    age, times = rng.randint(6, 14), rng.randint(3, 6)
    older = age * times
    _need(older <= 80)
    question = (f"{child.name} is {age} years old. {child.name}'s {role}, {elder.name}, is {_TIMES[times]} as old "
                f"as {child.name}. How many years older than {child.name} is {elder.name}?")
    s = _Solution()
    s.step(f"{elder.name} is", f"{age}*{times}", older, " years old")
    s.step(f"So {elder.name} is", f"{older}-{age}", older - age, f" years older than {child.name}")
    return question, s


@_template("percent", 2)
def test_score(rng):
    p = _person(rng)
    subject = rng.choice(["science", "history", "spelling", "geography"])
    total, percent = rng.choice([20, 25, 30, 40, 50, 60, 80]), 5 * rng.randint(10, 19)
    right = _pct(total, percent)
    question = (f"A {subject} test has {total} questions. {p.name} answered {percent}% of them correctly. "
                f"How many questions did {p.name} get wrong?")
    s = _Solution()
    s.step(f"{p.name} answered", f"{total}*{percent}/100", right, " questions correctly")
    s.step(f"So {p.they} got", f"{total}-{right}", total - right, " questions wrong")
    return question, s


@_template("fractions", 2)
def walkers_fraction(rng):
    school = rng.choice(["Maple Street School", "Riverside Elementary", "Hillcrest Academy"])
    den = rng.randint(3, 8)
    num = rng.randint(1, den - 1)
    _need(math.gcd(num, den) == 1)
    students = den * rng.randint(4, 25)
    bus = _div(students * num, den)
    question = (f"There are {students} students in the fourth grade at {school}. {num}/{den} of them ride the bus "
                f"to school and the rest walk. How many students walk to school?")
    s = _Solution()
    s.step("The number of students who ride the bus is", f"{students}*{num}/{den}", bus)
    s.step("So", f"{students}-{bus}", students - bus, " students walk to school")
    return question, s


@_template("unit_price", 2)
def marker_box(rng):
    item, container = rng.choice([("markers", "box"), ("candles", "pack"), ("tennis balls", "can"),
                                  ("pencils", "box"), ("light bulbs", "pack")])
    size, unit = rng.choice([3, 4, 6, 8, 10, 12]), rng.randint(1, 5)
    wanted = rng.randint(size + 1, 60)
    question = (f"A {container} of {size} {item} costs ${size * unit}, and the store also sells single {item} at "
                f"the same price each. How much would {wanted} {item} cost?")
    s = _Solution()
    s.step("Each one costs", f"{size * unit}/{size}", unit, money=True)
    s.step(f"So {wanted} {item} cost", f"{unit}*{wanted}", unit * wanted, money=True)
    return question, s


@_template("unit_price", 3)
def shopping_change(rng):
    p = _person(rng)
    goods = [("notebooks", 2, 5), ("pens", 1, 3), ("folders", 1, 4), ("t-shirts", 7, 15), ("mugs", 4, 9),
             ("candles", 3, 8), ("paintbrushes", 2, 6)]
    (first, lo1, hi1), (second, lo2, hi2) = rng.sample(goods, 2)
    n1, n2, p1, p2 = rng.randint(2, 6), rng.randint(2, 6), rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    c1, c2 = n1 * p1, n2 * p2
    _need(c1 + c2 < 100)
    bill = min(b for b in (20, 50, 100) if b > c1 + c2)
    question = (f"{p.name} buys {n1} {first} for ${p1} each and {n2} {second} for ${p2} each. {p.They} pays with "
                f"a ${bill} bill. How much change does {p.name} get back?")
    s = _Solution()
    s.step(f"The {first} cost", f"{n1}*{p1}", c1, money=True)
    s.step(f"The {second} cost", f"{n2}*{p2}", c2, money=True)
    s.step(f"{p.name} gets back", f"{bill}-{c1}-{c2}", bill - c1 - c2, " in change", money=True)
    return question, s


@_template("unit_price", 3)
def shared_packs(rng):
    club = rng.choice(["drama club", "robotics team", "garden club", "book club"])
    item = rng.choice(["stickers", "balloons", "party hats", "glow sticks"])
    size, packs, price, members = rng.choice([4, 5, 6, 8, 10, 12]), rng.randint(2, 9), rng.randint(3, 15), rng.randint(3, 8)
    cost = packs * price
    each = _div(cost, members)
    question = (f"The {club} is making goodie bags and needs {size * packs} {item}. The {item} come in packs of "
                f"{size}, and each pack costs ${price}. If the {members} members of the {club} split the cost "
                f"evenly, how much does each member pay?")
    s = _Solution()
    s.step("They need", f"{size * packs}/{size}", packs, " packs")
    s.step("The packs cost", f"{packs}*{price}", cost, money=True)
    s.step("Each member pays", f"{cost}/{members}", each, money=True)
    return question, s


@_template("rates", 3)
def two_leg_distance(rng):
    p = _person(rng)
    verb, lo, hi = rng.choice([("drives", 35, 70), ("cycles", 9, 18), ("rides a scooter", 12, 25)])
    fast, h1, h2 = rng.randint(lo, hi), rng.randint(2, 5), rng.randint(2, 4)
    slow = fast - rng.randint(3, 15)
    _need(slow > 0)
    d1, d2 = fast * h1, slow * h2
    question = (f"{p.name} {verb} at {fast} miles per hour for {h1} hours, then slows down to {slow} miles per hour "
                f"for {h2} more hours. How many miles does {p.name} travel in all?")
    s = _Solution()
    s.step(f"In the first part {p.they} covers", f"{fast}*{h1}", d1, " miles")
    s.step(f"In the second part {p.they} covers", f"{slow}*{h2}", d2, " miles")
    s.step(f"In all {p.they} travels", f"{d1}+{d2}", d1 + d2, " miles")
    return question, s


@_template("rates", 3)
def fill_tank(rng):
    container = rng.choice(["swimming pool", "water tank", "fish pond", "cattle trough"])
    r1, r2, minutes = rng.randint(2, 12), rng.randint(2, 12), rng.randint(10, 90)
    rate = r1 + r2
    missing, already = rate * minutes, rng.randint(20, 500)
    capacity = already + missing
    question = (f"A {container} holds {capacity} gallons and already has {already} gallons in it. Two hoses fill "
                f"it, one at {r1} gallons per minute and the other at {r2} gallons per minute. How many minutes "
                f"will it take to fill the {container}?")
    s = _Solution()
    s.step(f"The {container} still needs", f"{capacity}-{already}", missing, " gallons")
    s.step("Together the hoses pour", f"{r1}+{r2}", rate, " gallons per minute")
    s.step("It will take", f"{missing}/{rate}", minutes, " minutes to fill")
    return question, s


@_template("percent", 3)
def sale_discount(rng):
    p = _person(rng)
    item, items, lo, hi = rng.choice([("jacket", "jackets", 40, 120), ("pair of boots", "pairs of boots", 50, 150),
                                      ("backpack", "backpacks", 20, 80), ("lamp", "lamps", 20, 60),
                                      ("board game", "board games", 20, 60)])
    price, off, n = rng.randint(lo, hi), rng.choice([10, 15, 20, 25, 30, 40, 50]), rng.randint(2, 5)
    discount = _pct(price, off)
    sale = price - discount
    question = (f"A {item} normally costs ${price}. This weekend the store takes {off}% off the price. "
                f"{p.name} buys {n} {items} during the sale. How much does {p.name} spend?")
    s = _Solution()
    s.step("The discount is", f"{price}*{off}/100", discount, money=True)
    s.step(f"On sale each {item} costs", f"{price}-{discount}", sale, money=True)
    s.step(f"{p.name} spends", f"{sale}*{n}", sale * n, money=True)
    return question, s


@_template("time_units", 3)
def ribbon_pieces(rng):
    p = _person(rng)
    material, use = rng.choice([("ribbon", "wrap presents"), ("rope", "tie up tomato plants"),
                                ("lace", "decorate cards"), ("twine", "bundle newspapers")])
    feet, length = rng.randint(3, 15), rng.choice([2, 3, 4, 6, 8, 9])
    inches = feet * 12
    pieces = _div(inches, length)
    used = rng.randint(1, pieces - 1)
    question = (f"{p.name} has a roll of {material} that is {feet} feet long. {p.They} cuts all of it into pieces "
                f"{length} inches long and uses {used} of the pieces to {use}. How many pieces are left?")
    s = _Solution()
    s.step(f"The {material} is", f"{feet}*12", inches, " inches long")
    s.step(f"{p.They} cuts it into", f"{inches}/{length}", pieces, " pieces")
    s.step(f"{p.They} has", f"{pieces}-{used}", pieces - used, " pieces left")
    return question, s


@_template("time_units", 3)
def muffin_boxes(rng):
    item = rng.choice(["muffins", "bagels", "cupcakes", "cookies"])
    dozens, size, price = rng.randint(3, 20), rng.choice([3, 4, 6, 8, 12]), rng.randint(4, 15)
    count = dozens * 12
    boxes = _div(count, size)
    question = (f"A bakery bakes {dozens} dozen {item} every morning. It packs them in boxes of {size} and sells "
                f"each box for ${price}. How much money does the bakery make in a morning if it sells every box?")
    s = _Solution()
    s.step("The bakery bakes", f"{dozens}*12", count, f" {item}")
    s.step("That fills", f"{count}/{size}", boxes, " boxes")
    s.step("Selling them brings in", f"{boxes}*{price}", boxes * price, money=True)
    return question, s


@_template("comparison", 3)
def points_compare(rng):
    a, b, c = _people(rng, 3)
    game = rng.choice(["trivia game", "basketball game", "video game tournament", "quiz bowl"])
    first = rng.randint(12, 40)
    fewer, times = rng.randint(2, first // 2), rng.choice([2, 3])
    second = first - fewer
    third = second * times
    _need(third > first)
    question = (f"In a {game}, {a.name} scored {first} points. {b.name} scored {fewer} fewer points than {a.name}, "
                f"and {c.name} scored {_TIMES[times]} as many points as {b.name}. How many more points did "
                f"{c.name} score than {a.name}?")
    s = _Solution()
    s.step(f"{b.name} scored", f"{first}-{fewer}", second, " points")
    s.step(f"{c.name} scored", f"{second}*{times}", third, " points")
    s.step(f"{c.name} scored", f"{third}-{first}", third - first, f" more points than {a.name}")
    return question, s


@_template("fractions", 3)
def fuel_fraction(rng):
    p = _person(rng)
    tank, den, price = rng.choice([12, 14, 15, 16, 18, 20]), rng.randint(2, 6), rng.randint(3, 5)
    num = rng.randint(1, den - 1)
    _need(math.gcd(num, den) == 1)
    have = _div(tank * num, den)
    need = tank - have
    question = (f"{p.name}'s car has a {tank}-gallon gas tank that is {num}/{den} full. Gas costs ${price} per "
                f"gallon. How much will it cost {p.name} to fill the tank the rest of the way?")
    s = _Solution()
    s.step("The tank has", f"{tank}*{num}/{den}", have, " gallons in it")
    s.step(f"{p.name} needs", f"{tank}-{have}", need, " more gallons")
    s.step("Filling up costs", f"{need}*{price}", need * price, money=True)
    return question, s


@_template("rates", 4)
def machine_boxes(rng):
    factory, item = rng.choice([("toy factory", "toy cars"), ("bottling plant", "bottles"),
                                ("candy factory", "lollipops"), ("print shop", "flyers")])
    per_minute, hours, size, days = rng.randint(3, 30), rng.randint(2, 10), rng.choice([10, 12, 20, 24, 25, 50]), rng.randint(2, 6)
    minutes = hours * 60
    made = per_minute * minutes
    boxes = _div(made, size)
    question = (f"A machine at a {factory} makes {per_minute} {item} every minute. It runs for {hours} hours each "
                f"day, and the {item} are packed into boxes of {size}. How many boxes does the machine fill in "
                f"{days} days?")
    s = _Solution()
    s.step("The machine runs", f"{hours}*60", minutes, " minutes a day")
    s.step("It makes", f"{per_minute}*{minutes}", made, f" {item} a day")
    s.step("They fill", f"{made}/{size}", boxes, " boxes a day")
    s.step(f"In {days} days it fills", f"{boxes}*{days}", boxes * days, " boxes")
    return question, s


@_template("percent", 4)
def tutor_income(rng):
    p = _person(rng)
    subject = rng.choice(["math", "chemistry", "French", "piano"])
    rate, sessions, percent, books = rng.randint(20, 60), rng.randint(8, 30), rng.choice([10, 15, 20, 25]), rng.randint(10, 100)
    income = rate * sessions
    fee = _pct(income, percent)
    after = income - fee
    _need(after > books)
    question = (f"{p.name} tutors {subject} for ${rate} a session and taught {sessions} sessions last month. The "
                f"tutoring agency keeps {percent}% of what {p.they} earns, and {p.they} spent ${books} on workbooks. "
                f"How much money did {p.name} keep last month?")
    s = _Solution()
    s.step(f"{p.name} earned", f"{rate}*{sessions}", income, money=True)
    s.step("The agency kept", f"{income}*{percent}/100", fee, money=True)
    s.step(f"After the agency's share, {p.they} had", f"{income}-{fee}", after, money=True)
    s.step(f"After buying workbooks, {p.they} kept", f"{after}-{books}", after - books, money=True)
    return question, s


@_template("percent", 4)
def town_growth(rng):
    place, noun = rng.choice([("library", "books"), ("hiking club", "members"), ("town orchard", "trees"),
                              ("animal shelter", "volunteers")])
    start, p1, p2 = 100 * rng.randint(3, 40), rng.choice([10, 20, 25, 30, 40, 50]), rng.choice([10, 15, 20, 25, 30])
    g1 = _pct(start, p1)
    middle = start + g1
    g2 = _pct(middle, p2)
    question = (f"The {place} has {start} {noun}. This year the number of {noun} grew by {p1}%. Next year it is "
                f"expected to grow by another {p2}%. How many {noun} will the {place} have at the end of next year?")
    s = _Solution()
    s.step(f"This year the {place} gained", f"{start}*{p1}/100", g1, f" {noun}")
    s.step("That makes", f"{start}+{g1}", middle, f" {noun}")
    s.step("Next year it gains", f"{middle}*{p2}/100", g2, f" {noun}")
    s.step("At the end of next year it will have", f"{middle}+{g2}", middle + g2, f" {noun}")
    return question, s


@_template("fractions", 4)
def allowance_fractions(rng):
    p = _person(rng)
    first, second = rng.sample(["a video game", "concert tickets", "art supplies", "a new jacket", "a birthday gift"], 2)
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    money = a * b * rng.randint(2, 30)
    spent1 = _div(money, a)
    rest = money - spent1
    spent2 = _div(rest, b)
    question = (f"{p.name} has ${money}. {p.They} spends 1/{a} of it on {first}, then spends 1/{b} of the money "
                f"left on {second}. How much money does {p.name} have now?")
    s = _Solution()
    s.step(f"{p.name} spends", f"{money}/{a}", spent1, f" on {first}", money=True)
    s.step(f"{p.They} has", f"{money}-{spent1}", rest, " left", money=True)
    s.step(f"{p.They} spends", f"{rest}/{b}", spent2, f" on {second}", money=True)
    s.step(f"{p.name} now has", f"{rest}-{spent2}", rest - spent2, money=True)
    return question, s


@_template("multi_person", 4)
def party_pizza(rng):
    host = _person(rng)
    pizzas, slices, guests, each, friends = rng.randint(3, 8), rng.choice([8, 10, 12]), rng.randint(5, 15), rng.randint(2, 4), rng.randint(2, 4)
    total, eaten = pizzas * slices, guests * each
    left = total - eaten
    _need(left > 0)
    share = _div(left, friends)
    question = (f"For a party, {host.name} orders {pizzas} pizzas that are each cut into {slices} slices. Each of "
                f"the {guests} guests eats {each} slices. The leftover slices are split evenly among {friends} "
                f"friends to take home. How many slices does each friend take home?")
    s = _Solution()
    s.step("There are", f"{pizzas}*{slices}", total, " slices in all")
    s.step("The guests eat", f"{guests}*{each}", eaten, " slices")
    s.step("That leaves", f"{total}-{eaten}", left, " slices")
    s.step("Each friend takes home", f"{left}/{friends}", share, " slices")
    return question, s


@_template("time_units", 4)
def practice_hours(rng):
    p = _person(rng)
    activity = rng.choice(["practices the violin", "trains for a swim meet", "studies Spanish", "works on chess puzzles"])
    weekday, weekend = 15 * rng.randint(2, 8), 15 * rng.randint(2, 12)
    wd, we = weekday * 5, weekend * 2
    hours = _div(wd + we, 60)
    question = (f"{p.name} {activity} for {weekday} minutes every weekday and {weekend} minutes on each day of the "
                f"weekend. How many hours a week does {p.name} spend on it?")
    s = _Solution()
    s.step(f"On weekdays {p.they} spends", f"{weekday}*5", wd, " minutes")
    s.step(f"On the weekend {p.they} spends", f"{weekend}*2", we, " minutes")
    s.step(f"In total {p.they} spends", f"{wd}+{we}", wd + we, " minutes a week")
    s.step("That is", f"{wd + we}/60", hours, " hours")
    return question, s


@_template("time_units", 4)
def flour_bags(rng):
    grams, days, bag, bags = rng.choice([250, 400, 500, 600, 750]), rng.randint(2, 7), rng.choice([5, 10, 25]), rng.randint(2, 12)
    loaves = _div(bags * bag * 1000, grams * days)
    _need(5 <= loaves <= 150)
    daily = grams * loaves
    total = daily * days
    kilos = _div(total, 1000)
    question = (f"A bakery uses {grams} grams of flour for each loaf of bread. It bakes {loaves} loaves a day for "
                f"{days} days. Flour comes in {bag}-kilogram bags. If there are 1000 grams in a kilogram, how many "
                f"bags of flour does the bakery use?")
    s = _Solution()
    s.step("Each day the bakery uses", f"{grams}*{loaves}", daily, " grams of flour")
    s.step(f"Over {days} days it uses", f"{daily}*{days}", total, " grams")
    s.step("That is", f"{total}/1000", kilos, " kilograms")
    s.step("So it uses", f"{kilos}/{bag}", bags, " bags of flour")
    return question, s


@_template("price_tiers", 4)
def taxi_fare(rng):
    start, high, first = rng.randint(3, 8), rng.randint(3, 5), rng.randint(3, 10)
    low, ride = rng.randint(1, high - 1), first + rng.randint(2, 20)
    first_cost, extra = first * high, ride - first
    extra_cost = extra * low
    question = (f"A taxi charges ${start} to start a ride, ${high} per mile for the first {first} miles, and ${low} "
                f"per mile after that. How much does a {ride}-mile ride cost?")
    s = _Solution()
    s.step(f"The first {first} miles cost", f"{first}*{high}", first_cost, money=True)
    s.step("The ride goes", f"{ride}-{first}", extra, f" miles past the first {first}")
    s.step("Those miles cost", f"{extra}*{low}", extra_cost, money=True)
    s.step("The whole ride costs", f"{start}+{first_cost}+{extra_cost}", start + first_cost + extra_cost, money=True)
    return question, s


@_template("price_tiers", 4)
def parking_fee(rng):
    p = _person(rng)
    first, half, hours = rng.randint(3, 10), rng.randint(1, 4), rng.randint(2, 9)
    extra = hours - 1
    halves = extra * 2
    cost = halves * half
    question = (f"A parking garage charges ${first} for the first hour and ${half} for each additional half hour. "
                f"{p.name} parks there for {hours} hours. How much does {p.name} pay?")
    s = _Solution()
    s.step(f"After the first hour, {p.name} parks", f"{hours}-1", extra, " more hours")
    s.step("That is", f"{extra}*2", halves, " half hours")
    s.step("The extra half hours cost", f"{halves}*{half}", cost, money=True)
    s.step(f"{p.name} pays", f"{first}+{cost}", first + cost, money=True)
    return question, s


@_template("comparison", 4)
def stamp_collections(rng):
    a, b, c = _people(rng, 3)
    item = rng.choice(["stamps", "coins", "postcards", "seashells", "baseball cards"])
    count, more = rng.randint(10, 60), 2 * rng.randint(1, 15)
    twice = count * 2
    second = twice + more
    third = _div(second, 2)
    question = (f"{a.name} has {count} {item}. {b.name} has {more} more than twice as many {item} as {a.name}, and "
                f"{c.name} has half as many as {b.name}. How many more {item} does {b.name} have than {c.name}?")
    s = _Solution()
    s.step(f"Twice {a.name}'s {item} is", f"{count}*2", twice)
    s.step(f"{b.name} has", f"{twice}+{more}", second, f" {item}")
    s.step(f"{c.name} has", f"{second}/2", third, f" {item}")
    s.step(f"{b.name} has", f"{second}-{third}", second - third, f" more {item} than {c.name}")
    return question, s


@_template("fractions", 5)
def marble_colors(rng):
    p, friend = _people(rng, 2)
    item = rng.choice(["marbles", "beads", "balloons", "crayons"])
    b, d = rng.randint(3, 6), rng.randint(2, 5)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    _need(math.gcd(a, b) == 1 and math.gcd(c, d) == 1)
    total = 2 * b * d * rng.randint(1, 5)
    _need(total <= 400)
    red = _div(total * a, b)
    rest = total - red
    blue = _div(rest * c, d)
    green = rest - blue
    question = (f"{p.name} has {total} {item}. {a}/{b} of them are red, {c}/{d} of the remaining {item} are blue, "
                f"and the rest are green. If {p.name} gives half of the green {item} to {friend.name}, how many "
                f"green {item} does {p.name} have left?")
    s = _Solution()
    s.step(f"{p.name} has", f"{total}*{a}/{b}", red, f" red {item}")
    s.step("That leaves", f"{total}-{red}", rest, f" {item}")
    s.step("Of those,", f"{rest}*{c}/{d}", blue, " are blue")
    s.step("So", f"{rest}-{blue}", green, " are green")
    s.step(f"After giving half away, {p.name} has", f"{green}/2", _div(green, 2), f" green {item} left")
    return question, s


@_template("price_tiers", 5)
def museum_group(rng):
    place = rng.choice(["science museum", "aquarium", "zoo", "botanical garden"])
    adult = rng.randint(12, 25)
    child = rng.randint(5, adult - 3)
    senior = rng.randint(child, adult - 1)
    na, nc, ns, coupon = rng.randint(2, 6), rng.randint(2, 10), rng.randint(2, 4), rng.randint(5, 20)
    ca, cc, cs = adult * na, child * nc, senior * ns
    subtotal = ca + cc + cs
    question = (f"Tickets to the {place} cost ${adult} for adults, ${child} for children, and ${senior} for "
                f"seniors. A group of {na} adults, {nc} children, and {ns} seniors visits, and they use a coupon "
                f"for ${coupon} off the total. How much do they pay?")
    s = _Solution()
    s.step("Adult tickets cost", f"{adult}*{na}", ca, money=True)
    s.step("Children's tickets cost", f"{child}*{nc}", cc, money=True)
    s.step("Seniors' tickets cost", f"{senior}*{ns}", cs, money=True)
    s.step("Before the coupon the total is", f"{ca}+{cc}+{cs}", subtotal, money=True)
    s.step("With the coupon they pay", f"{subtotal}-{coupon}", subtotal - coupon, money=True)
    return question, s


@_template("multi_person", 5)
def cookie_sale(rng):
    a, b, c, d = _people(rng, 4)
    item = rng.choice(["boxes of cookies", "raffle tickets", "candles", "cups of lemonade"])
    first, more, price = rng.randint(10, 40), rng.randint(3, 15), rng.randint(2, 6)
    fewer = rng.randint(2, first - 2)
    second, fourth = first + more, first - fewer
    third = second * 2
    total = first + second + third + fourth
    question = (f"Four friends sold {item} for a school fundraiser at ${price} each. {a.name} sold {first}, "
                f"{b.name} sold {more} more than {a.name}, {c.name} sold twice as many as {b.name}, and {d.name} "
                f"sold {fewer} fewer than {a.name}. How much money did they raise?")
    s = _Solution()
    s.step(f"{b.name} sold", f"{first}+{more}", second, f" {item}")
    s.step(f"{c.name} sold", f"{second}*2", third, f" {item}")
    s.step(f"{d.name} sold", f"{first}-{fewer}", fourth, f" {item}")
    s.step("Together they sold", f"{first}+{second}+{third}+{fourth}", total, f" {item}")
    s.step("They raised", f"{total}*{price}", total * price, money=True)
    return question, s


@_template("rates", 5)
def reading_days(rng):
    p = _person(rng)
    pages, minutes, hours, days, done = rng.randint(3, 12), rng.choice([10, 12, 15, 20, 30]), rng.randint(2, 4), rng.randint(2, 12), rng.randint(10, 150)
    stretches = 60 // minutes
    per_hour = stretches * pages
    per_day = per_hour * hours
    left = days * per_day
    book = done + left
    question = (f"{p.name} reads {pages} pages every {minutes} minutes and reads for {hours} hours each day. "
                f"The book {p.they} is reading has {book} pages, and {p.they} has already read {done} of them. How many more "
                f"days will it take {p.name} to finish the book?")
    s = _Solution()
    s.step(f"In an hour {p.name} reads for", f"60/{minutes}", stretches, f" stretches of {minutes} minutes")
    s.step(f"So {p.they} reads", f"{stretches}*{pages}", per_hour, " pages an hour")
    s.step(f"Each day {p.they} reads", f"{per_hour}*{hours}", per_day, " pages")
    s.step(f"{p.They} still has", f"{book}-{done}", left, " pages to read")
    s.step("It will take", f"{left}/{per_day}", days, " more days")
    return question, s


@_template("comparison", 5)
def savings_race(rng):
    a, b = _people(rng, 2)
    start_a, start_b, weekly_a, weekly_b, weeks = rng.randint(20, 200), rng.randint(5, 150), rng.randint(5, 25), rng.randint(5, 25), rng.randint(4, 20)
    added_a, added_b = weekly_a * weeks, weekly_b * weeks
    total_a, total_b = start_a + added_a, start_b + added_b
    _need(total_b > total_a)
    question = (f"{a.name} has ${start_a} saved and adds ${weekly_a} every week. {b.name} has ${start_b} saved and "
                f"adds ${weekly_b} every week. After {weeks} weeks, how much more money does {b.name} have than "
                f"{a.name}?")
    s = _Solution()
    s.step(f"{a.name} adds", f"{weekly_a}*{weeks}", added_a, money=True)
    s.step(f"{a.name} then has", f"{start_a}+{added_a}", total_a, money=True)
    s.step(f"{b.name} adds", f"{weekly_b}*{weeks}", added_b, money=True)
    s.step(f"{b.name} then has", f"{start_b}+{added_b}", total_b, money=True)
    s.step(f"{b.name} has", f"{total_b}-{total_a}", total_b - total_a, f" more than {a.name}", money=True)
    return question, s


@_template("percent", 6)
def ticket_increase(rng):
    event = rng.choice(["county fair", "water park", "planetarium show", "ice rink"])
    old, percent, adults, children = rng.randint(8, 40), rng.choice([10, 20, 25, 50]), rng.randint(2, 4), rng.randint(2, 5)
    rise = _pct(old, percent)
    new = old + rise
    child = _div(new, 2)
    ca, cc = new * adults, child * children
    question = (f"Last year an adult ticket to the {event} cost ${old}. This year the price went up by {percent}%. "
                f"A child's ticket costs half the price of an adult ticket. How much will {adults} adult tickets "
                f"and {children} child tickets cost this year?")
    s = _Solution()
    s.step("The price went up by", f"{old}*{percent}/100", rise, money=True)
    s.step("An adult ticket now costs", f"{old}+{rise}", new, money=True)
    s.step("A child's ticket costs", f"{new}/2", child, money=True)
    s.step("The adult tickets cost", f"{new}*{adults}", ca, money=True)
    s.step("The child tickets cost", f"{child}*{children}", cc, money=True)
    s.step("Altogether the tickets cost", f"{ca}+{cc}", ca + cc, money=True)
    return question, s


@_template("price_tiers", 6)
def gym_membership(rng):
    p = _person(rng)
    fee, intro, early, years, sessions, session = rng.randint(20, 100), rng.choice([3, 6]), rng.randint(15, 40), rng.randint(2, 3), rng.randint(2, 10), rng.randint(25, 60)
    late = early + rng.randint(3, 15)
    months = years * 12
    later = months - intro
    c_early, c_late, c_sessions = intro * early, later * late, sessions * session
    question = (f"A gym charges a ${fee} sign-up fee, then ${early} a month for the first {intro} months and ${late} "
                f"a month after that. Personal training sessions cost ${session} each. {p.name} was a member for "
                f"{years} years and took {sessions} training sessions. How much did {p.name} pay the gym in total?")
    s = _Solution()
    s.step(f"{years} years is", f"{years}*12", months, " months")
    s.step(f"After the first {intro} months, {p.name} paid for", f"{months}-{intro}", later, " more months")
    s.step(f"The first {intro} months cost", f"{intro}*{early}", c_early, money=True)
    s.step("The later months cost", f"{later}*{late}", c_late, money=True)
    s.step("The training sessions cost", f"{sessions}*{session}", c_sessions, money=True)
    s.step(f"In total {p.name} paid", f"{fee}+{c_early}+{c_late}+{c_sessions}", fee + c_early + c_late + c_sessions, money=True)
    return question, s


@_template("price_tiers", 6)
def notebook_order(rng):
    price, cutoff, per_class, classes = rng.randint(2, 5), rng.choice([50, 100, 200]), rng.randint(20, 60), rng.randint(4, 12)
    cheap = rng.randint(1, price - 1)
    total = per_class * classes
    _need(total > cutoff)
    first, extra = cutoff * price, total - cutoff
    extra_cost = extra * cheap
    bill = first + extra_cost
    each = _div(bill, classes)
    question = (f"A supplier sells notebooks for ${price} each, but every notebook after the first {cutoff} in an "
                f"order costs only ${cheap}. A school orders {per_class} notebooks for each of its {classes} "
                f"classes in one order and splits the bill evenly between the classes. How much does each class pay?")
    s = _Solution()
    s.step("The school orders", f"{per_class}*{classes}", total, " notebooks")
    s.step(f"The first {cutoff} cost", f"{cutoff}*{price}", first, money=True)
    s.step("The rest are", f"{total}-{cutoff}", extra, " notebooks")
    s.step("They cost", f"{extra}*{cheap}", extra_cost, money=True)
    s.step("The whole order costs", f"{first}+{extra_cost}", bill, money=True)
    s.step("Each class pays", f"{bill}/{classes}", each, money=True)
    return question, s


@_template("multi_person", 6)
def yard_sale(rng):
    a, b, c = _people(rng, 3)
    toys, toy_price, books, book_price, times = rng.randint(3, 15), rng.randint(2, 8), rng.randint(5, 20), rng.randint(1, 5), rng.choice([2, 3])
    made_a, toys_c, made_b = toys * toy_price, toys * times, books * book_price
    made_c = toys_c * toy_price
    total = made_a + made_b + made_c
    share = _div(total, 3)
    question = (f"{a.name}, {b.name}, and {c.name} held a yard sale. {a.name} sold {toys} toys for ${toy_price} "
                f"each, {b.name} sold {books} books for ${book_price} each, and {c.name} sold {_TIMES[times]} as "
                f"many toys as {a.name} at the same price. If they split the money equally, how much does each of "
                f"them get?")
    s = _Solution()
    s.step(f"{a.name} made", f"{toys}*{toy_price}", made_a, money=True)
    s.step(f"{c.name} sold", f"{toys}*{times}", toys_c, " toys")
    s.step(f"{c.name} made", f"{toys_c}*{toy_price}", made_c, money=True)
    s.step(f"{b.name} made", f"{books}*{book_price}", made_b, money=True)
    s.step("Together they made", f"{made_a}+{made_b}+{made_c}", total, money=True)
    s.step("Each of them gets", f"{total}/3", share, money=True)
    return question, s


@_template("rates", 7)
def bakery_week(rng):
    p = _person(rng)
    daily, slices, price, ingredients = rng.randint(5, 20), rng.choice([6, 8, 10, 12]), rng.randint(2, 5), rng.randint(5, 15)
    _need(slices * price > ingredients)
    weekdays, saturday = daily * 5, daily * 2
    cakes = weekdays + saturday
    pieces = cakes * slices
    revenue, cost = pieces * price, cakes * ingredients
    question = (f"{p.name}'s bakery bakes {daily} cakes each day from Monday to Friday and twice as many on "
                f"Saturday. It is closed on Sunday. Each cake is cut into {slices} slices that sell for ${price} "
                f"each, and the ingredients for one cake cost ${ingredients}. If every slice sells, how much profit "
                f"does the bakery make in a week?")
    s = _Solution()
    s.step("From Monday to Friday it bakes", f"{daily}*5", weekdays, " cakes")
    s.step("On Saturday it bakes", f"{daily}*2", saturday, " cakes")
    s.step("In a week it bakes", f"{weekdays}+{saturday}", cakes, " cakes")
    s.step("That makes", f"{cakes}*{slices}", pieces, " slices")
    s.step("The slices sell for", f"{pieces}*{price}", revenue, money=True)
    s.step("The ingredients cost", f"{cakes}*{ingredients}", cost, money=True)
    s.step("The weekly profit is", f"{revenue}-{cost}", revenue - cost, money=True)
    return question, s


@_template("percent", 7)
def shirt_markup(rng):
    item, items = rng.choice([("shirt", "shirts"), ("scarf", "scarves"), ("hat", "hats"), ("mug", "mugs")])
    count, cost, percent = rng.randint(20, 80), rng.randint(6, 20), rng.choice([20, 25, 40, 50, 60, 75, 100])
    full = rng.randint(count // 2, count - 2)
    markup = _pct(cost, percent)
    price = cost + markup
    half = _div(price, 2)
    rest = count - full
    full_sales, rest_sales = full * price, rest * half
    question = (f"A shop buys {count} {items} for ${cost} each and marks up the price by {percent}%. It sells "
                f"{full} of them at the marked price and the rest at half the marked price. How much money does the "
                f"shop take in from selling all the {items}?")
    s = _Solution()
    s.step("The markup is", f"{cost}*{percent}/100", markup, money=True)
    s.step(f"Each {item} is priced at", f"{cost}+{markup}", price, money=True)
    s.step(f"The first {full} bring in", f"{full}*{price}", full_sales, money=True)
    s.step("There are", f"{count}-{full}", rest, f" {items} left")
    s.step("Half the marked price is", f"{price}/2", half, money=True)
    s.step("The rest bring in", f"{rest}*{half}", rest_sales, money=True)
    s.step("In all the shop takes in", f"{full_sales}+{rest_sales}", full_sales + rest_sales, money=True)
    return question, s


@_template("time_units", 7)
def road_trip(rng):
    p = _person(rng)
    speeds = [5 * rng.randint(11, 14), 5 * rng.randint(7, 10), 5 * rng.randint(4, 6)]
    hours = [rng.randint(2, 5), rng.randint(2, 3), rng.randint(2, 3)]
    d1, d2, d3 = (v * h for v, h in zip(speeds, hours))
    s1, s2, s3 = speeds
    breaks, length = rng.randint(2, 4), rng.choice([10, 15, 20, 25, 30])
    driving = sum(hours)
    minutes, resting = driving * 60, breaks * length
    question = (f"{p.name} drives {d1} miles on the highway at {s1} miles per hour, then {d2} miles on country "
                f"roads at {s2} miles per hour, and finally {d3} miles through town at {s3} miles per hour. "
                f"{p.They} also takes {breaks} breaks of {length} minutes each. How many minutes does the whole "
                f"trip take?")
    s = _Solution()
    t1 = s.step("The highway part takes", f"{d1}/{s1}", hours[0], " hours")
    t2 = s.step("The country roads take", f"{d2}/{s2}", hours[1], " hours")
    t3 = s.step("The drive through town takes", f"{d3}/{s3}", hours[2], " hours")
    s.step("Driving takes", f"{t1}+{t2}+{t3}", driving, " hours")
    s.step("That is", f"{driving}*60", minutes, " minutes")
    s.step("The breaks take", f"{breaks}*{length}", resting, " minutes")
    s.step("The whole trip takes", f"{minutes}+{resting}", minutes + resting, " minutes")
    return question, s


@_template("multi_person", 8)
def harvest_sale(rng):
    a, b, c = _people(rng, 3)
    fruit = rng.choice(["apples", "peaches", "pears", "plums"])
    per_basket, baskets_a, more, bag, price = rng.randint(10, 30), rng.randint(3, 10), rng.randint(1, 8), rng.choice([4, 5, 6, 8, 10]), rng.randint(2, 6)
    picked_a = baskets_a * per_basket
    baskets_b = baskets_a + more
    picked_b = baskets_b * per_basket
    baskets_c = _div(baskets_b, 2)
    picked_c = baskets_c * per_basket
    total = picked_a + picked_b + picked_c
    bags = _div(total, bag)
    question = (f"{a.name}, {b.name}, and {c.name} pick {fruit} at an orchard. Every basket holds {per_basket} "
                f"{fruit}. {a.name} fills {baskets_a} baskets, {b.name} fills {more} more baskets than {a.name}, and "
                f"{c.name} fills half as many baskets as {b.name}. They sell all the {fruit} in bags of {bag} for "
                f"${price} a bag. How much money do they make?")
    s = _Solution()
    s.step(f"{a.name} picks", f"{baskets_a}*{per_basket}", picked_a, f" {fruit}")
    s.step(f"{b.name} fills", f"{baskets_a}+{more}", baskets_b, " baskets")
    s.step(f"{b.name} picks", f"{baskets_b}*{per_basket}", picked_b, f" {fruit}")
    s.step(f"{c.name} fills", f"{baskets_b}/2", baskets_c, " baskets")
    s.step(f"{c.name} picks", f"{baskets_c}*{per_basket}", picked_c, f" {fruit}")
    s.step("Together they pick", f"{picked_a}+{picked_b}+{picked_c}", total, f" {fruit}")
    s.step("That fills", f"{total}/{bag}", bags, " bags")
    s.step("They make", f"{bags}*{price}", bags * price, money=True)
    return question, s


@_template("price_tiers", 8)
def school_trip(rng):
    place = rng.choice(["science center", "history museum", "aquarium", "state capitol"])
    seats, buses, teachers = rng.choice([20, 25, 30, 40]), rng.randint(2, 4), rng.randint(3, 8)
    student_fee, rent, lunch = rng.randint(5, 15), rng.randint(150, 400), rng.randint(5, 12)
    teacher_fee = student_fee + rng.randint(2, 8)
    people = seats * buses
    students = people - teachers
    c_bus, c_students, c_teachers, c_lunch = buses * rent, students * student_fee, teachers * teacher_fee, people * lunch
    total = c_bus + c_students + c_teachers + c_lunch
    budget = 500 * (total // 500 + rng.randint(1, 3))
    question = (f"A school trip to the {place} takes {students} students and {teachers} teachers. Every seat is "
                f"filled on the buses, which hold {seats} people each and cost ${rent} per bus. Entry costs "
                f"${student_fee} per student and ${teacher_fee} per teacher, and lunch costs ${lunch} per person. "
                f"The school has a budget of ${budget} for the trip. How much of the budget is left over?")
    s = _Solution()
    s.step("There are", f"{students}+{teachers}", people, " people on the trip")
    s.step("They fill", f"{people}/{seats}", buses, " buses")
    s.step("The buses cost", f"{buses}*{rent}", c_bus, money=True)
    s.step("Student entry costs", f"{students}*{student_fee}", c_students, money=True)
    s.step("Teacher entry costs", f"{teachers}*{teacher_fee}", c_teachers, money=True)
    s.step("Lunch costs", f"{people}*{lunch}", c_lunch, money=True)
    s.step("The trip costs", f"{c_bus}+{c_students}+{c_teachers}+{c_lunch}", total, " in all", money=True)
    s.step("The school has", f"{budget}-{total}", budget - total, " left over", money=True)
    return question, s


# --- generating and checking ----------------------------------------------------------------------

def _sample(template: Template, rng: random.Random, attempts: int = 1000) -> tuple[str, _Solution]:
    for _ in range(attempts):
        try:
            return template.build(rng)
        except _Resample:
            pass
    raise RuntimeError(f"template {template.name} found no valid numbers in {attempts} draws")


def _check(problem: dict, template: Template) -> None:
    """Recompute every annotation and enforce the format; a failure is a template bug, so it raises."""

    def fail(why: str) -> NoReturn:
        raise ValueError(f"template {template.name} made a bad problem ({why}): {problem}")

    if not problem["question"].endswith("?"):
        fail("question does not end with '?'")
    *lines, last = problem["answer"].split("\n")
    final = re.fullmatch(r"#### ([1-9][0-9]*)", last)
    if final is None or problem["answer"].count("####") != 1:
        fail("answer must end with the only '#### N' line, N a positive integer")
    if len(lines) != template.steps:
        fail(f"{len(lines)} solution lines, template declares {template.steps}")
    for line in lines:
        notes = ANNOTATION_RE.findall(line)
        if len(notes) != 1:
            fail(f"{len(notes)} annotations in one line")
        expression, result = notes[0]
        if not re.fullmatch(r"[1-9][0-9]*", result):
            fail(f"result {result!r} is not a positive integer")
        if safe_eval(expression) != Decimal(result):
            fail(f"{expression} is {safe_eval(expression)}, not {result}")
    if result != final.group(1):
        fail("'#### N' differs from the last annotation's result")


_ID_RE = re.compile(r"synthetic-(\d+)(?:-(\d+))?")


def parse_id(name: str) -> tuple[int, int | None] | None:
    """(seed, index) of a generated problem's id, synthetic-<seed>-<index>; None for any other name.

    The name of a generated split, synthetic-<seed> (scores.json's split of a robustness
    evaluation), gives (seed, None).
    """
    match = _ID_RE.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def generate(n: int, seed: int) -> list[dict]:
    """n checked problems for a seed, with ids synthetic-<seed>-<index>.

    Templates are dealt in shuffled rounds, so each appears once in every len(TEMPLATES)
    problems, and one rng drives everything in order, so generate(10, s) is a prefix of
    generate(20, s).
    """
    rng = random.Random(seed)
    problems: list[dict] = []
    deck: list[Template] = []
    for i in range(n):
        if not deck:
            deck = rng.sample(TEMPLATES, len(TEMPLATES))
        template = deck.pop()
        question, solution = _sample(template, rng)
        problem = {
            "id": f"synthetic-{seed}-{i}",
            "question": question,
            "answer": "\n".join([*solution.lines, f"#### {solution.answer}"]),
            "template": template.name,
            "steps": len(solution.lines),
        }
        _check(problem, template)
        problems.append(problem)
    return problems
