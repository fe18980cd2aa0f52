# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""Word lists for the synthetic long-context tasks (RULER-style, https://arxiv.org/abs/2404.06654).

The one idea: every haystack, key, list and coded word is built from these fixed lists and a seeded generator,
so a task row is fully determined by its seed and needs no downloaded corpus. All words are lowercase ASCII letters
and unique within each list; `VARIABLE_NAMES` and `CODED_WORDS` are drawn once from fixed seeds.
"""

from __future__ import annotations

import random

ADJECTIVES: tuple[str, ...] = tuple("""
    able ancient angry bitter black blue bold brave bright brisk broad broken busy calm careful cheap clean clear
    clever cold cool crisp cruel curious damp dark deep dense distant dry dull dusty eager early easy empty faint
    fair famous fast fierce fine firm flat fresh friendly full gentle giant glad golden good grand gray great green
    happy hard harsh heavy hidden high hollow honest hot huge humble hungry icy idle jolly keen kind large late
    lazy light little lively lonely long loud low loyal lucky mellow mild modern modest narrow neat new nimble noble
    odd old orange pale patient plain polite poor proud purple quick quiet rapid rare red rich rough round royal
    rural rusty sad safe salty scarlet sharp shiny short shy silent silver simple slow small smooth soft solid sour
    spare steady steep stiff still stormy strange strict strong sudden sunny sweet swift tall tame tender thick thin
    tidy tiny tired tough true ugly upper urban vast violet vivid warm weak wealthy weary wet white wide wild wise
    witty wooden yellow young
    """.split())

NOUNS: tuple[str, ...] = tuple("""
    acorn anchor apple arrow attic badge bakery balcony banner barn basket beach bean bell bench berry blanket boat
    bottle bridge brook brush bucket cabin cable camera candle canoe canyon carpet castle cellar chair chimney circle
    cliff clock cloud coast coin comet copper cottage cradle crown crystal cup curtain dagger desert desk diamond
    dragon drum eagle engine falcon feather fence ferry field flag flame flute forest fountain fox garden gate glove
    granite grape harbor harvest hammer helmet hill honey horse island ivory jacket jewel kettle kitchen ladder lake
    lamp lantern leaf lemon library lighthouse lily lion marble market meadow mirror moon mountain needle nest oak
    ocean olive orchard otter owl paddle palace panther parrot pebble pencil pepper piano pigeon pillow pine planet
    plum pond potato puzzle quarry rabbit railway raven ribbon river road robin rocket saddle sail salmon sand
    scarf shadow shell shelter ship shovel signal spider spoon spring stable stamp star statue stone storm stream
    street sugar summit swan sword table teapot temple thunder tiger timber torch tower tractor train treasure tree
    trumpet tunnel turtle umbrella valley velvet village violin wagon wall walnut whale wheel willow window wolf
    yard zebra
    """.split())

VERBS: tuple[str, ...] = tuple("""
    admired avoided borrowed built carried chased cleaned climbed collected copied covered crossed delivered
    described discovered dropped emptied examined filled finished followed found gathered guarded helped hid lifted
    measured mended moved noticed opened painted passed planted polished pulled pushed raised reached repaired
    returned saved searched shared showed sold sorted studied touched traded visited washed watched weighed wrapped
    """.split())

ADVERBS: tuple[str, ...] = tuple("""
    again always carefully calmly early eagerly gently happily later loudly nearly never often quickly quietly
    rarely slowly softly soon suddenly today warmly
    """.split())

PLACES: tuple[str, ...] = tuple("""
    above across after against along around before behind below beneath beside beyond during inside near under
    """.split())

PEOPLE: tuple[str, ...] = tuple("""
    baker builder captain carpenter child doctor farmer fisher gardener guard hunter judge keeper merchant miller
    miner nurse painter pilot poet potter sailor scholar singer teacher tailor traveler weaver writer
    """.split())

# Words of the common-words task: real words from the lists above.
LIST_WORDS: tuple[str, ...] = tuple(sorted(set(NOUNS) | set(VERBS) | set(PEOPLE)))

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _coded_words(count: int, seed: int) -> tuple[str, ...]:
    """Pronounceable nonsense words (consonant-vowel syllables) that are not English words of these lists."""
    rng = random.Random(seed)
    known = set(ADJECTIVES) | set(NOUNS) | set(VERBS) | set(ADVERBS) | set(PLACES) | set(PEOPLE)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if rng.random() < 0.5:
            word += rng.choice(_CONSONANTS)
        if word not in seen and word not in known:
            seen.add(word)
            words.append(word)
    return tuple(words)


def _variable_names(count: int, seed: int) -> tuple[str, ...]:
    """Five-letter upper-case variable names."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return tuple(names)


# Coded words of the frequent-words task.
CODED_WORDS: tuple[str, ...] = _coded_words(200, seed=20260501)
# Variable names of the variable-tracking task.
VARIABLE_NAMES: tuple[str, ...] = _variable_names(200, seed=20260502)
