"""CommonGen (Lin et al. 2020): concept sets with reference sentences, from the hub, IPA's files or a local JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from lightning_ipa.data import PromptDataModule, check_sizes, read_records, text_lines
from tasks.concepts import concept_sets

HUB_NAME = "allenai/common_gen"
ORDERED_TEMPLATE = "Generate a sentence including the following keywords in the same order as listed: {concepts}\n\nAnswer:"
UNORDERED_TEMPLATE = "Generate a sentence including the following keywords in any order: {concepts}\n\nAnswer:"
EXPECTED = (
    'a row like {"concepts": ["dog", "catch", "frisbee"], "references": ["The dog catches a frisbee."]} (references optional), '
    'a hub row {"concept_set_idx": 0, "concepts": [...], "target": "..."}, or an IPA item {"human_order": ["dog-catch-frisbee"], ...}'
)

ConceptSet = dict[str, Any]  # {"concepts": [words], "references": [sentences]}


def is_word_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(w, str) and w.strip() for w in value)


def parse_row(where: str, row: Any) -> tuple[Any, ConceptSet]:
    """(key, concept set) of one row; rows sharing a key (a hub concept set, one row per reference) are merged later."""

    def malformed(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}; expected {EXPECTED}")

    if not isinstance(row, dict):
        raise malformed(f"a row must be an object, got {type(row).__name__}")
    if "human_order" in row:  # IPA's layout: the concepts in the orders people used them, e.g. "dog-catch-frisbee"
        orders = row["human_order"]
        if not isinstance(orders, list) or not all(isinstance(o, str) and is_word_list(o.split("-")) for o in orders):
            raise malformed(f"'human_order' must be a list of dash-joined words like 'dog-catch-frisbee', got {orders!r}")
        concepts = orders[0].split("-") if orders else []  # the first human order, as IPA's evaluation reads it
        references = row.get("references", [])
    elif "concepts" in row:
        concepts = row["concepts"]
        if not is_word_list(concepts):
            raise malformed(f"'concepts' must be a non-empty list of words, got {concepts!r}")
        if "concept_set_idx" in row:  # a hub row: one reference each
            target = row.get("target")
            if not isinstance(target, str):
                raise malformed(f"'target' must be a string, got {target!r}")
            return ("hub", row["concept_set_idx"]), {"concepts": list(concepts), "references": [target] if target.strip() else []}
        references = row.get("references", [])
    else:
        raise malformed(f"no 'concepts' or 'human_order' field (fields: {sorted(row)})")
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise malformed(f"'references' must be a list of sentences, got {references!r}")
    return ("row", where), {"concepts": list(concepts), "references": [r for r in references if r.strip()]}


def read_concept_sets(source: str, split: str = "train") -> list[ConceptSet]:
    """The concept sets of a source in order of first appearance; hub rows of one ``concept_set_idx`` merged.

    IPA's files (``train.json``, ``val.json``, ``test.json``) are one JSON object mapping ids to items;
    items whose ``human_order`` is empty are skipped, as IPA does.
    """
    sets: dict[Any, ConceptSet] = {}
    for where, row in records(source, split):
        key, concept_set = parse_row(where, row)
        if not concept_set["concepts"]:
            continue
        if key not in sets:
            sets[key] = concept_set
        elif sets[key]["concepts"] != concept_set["concepts"]:
            known = sets[key]["concepts"]
            raise ValueError(f"{where}: concept set {key[1]!r} has concepts {concept_set['concepts']} here but {known} before")
        else:
            sets[key]["references"] += concept_set["references"]
    return list(sets.values())


def records(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """``read_records``, plus IPA's layout: a ``.json`` file holding one object that maps ids to items.

    Raises:
        ValueError: a file that is not UTF-8 (file:line:column, ``text_lines``) or not JSON; as ``read_records``.
    """
    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        try:
            whole = json.loads("\n".join(line for _, line in text_lines(path)))
        except json.JSONDecodeError:
            whole = None  # JSON lines: read row by row below
        if isinstance(whole, dict) and not {"concepts", "human_order"} & set(whole):
            yield from ((f"{path} item {key!r}", item) for key, item in whole.items())
            return
    yield from read_records(source, split)


def generated_sets(n: int, rng: random.Random, exclude: set[frozenset[str]]) -> list[ConceptSet]:
    """n concept sets of 3 or 4 words (one verb, the rest nouns) from the word lists of ``tasks.concepts``, none in ``exclude``."""
    drawn = [s for s in concept_sets(n + len(exclude), 3, rng) + concept_sets(n + len(exclude), 4, rng) if frozenset(s) not in exclude]
    rng.shuffle(drawn)
    return [{"concepts": list(s), "references": []} for s in drawn[:n]]


class CommonGenDataModule(PromptDataModule):
    """Prompts asking for one sentence with all concepts of a set; meta: ``{"concepts", "references"}``.

    Splits (seeded): from the hub, ``train`` trains and the ``validation`` split gives val and test (the
    hub's ``test`` split has no references); from a file, val and test come first and the rest trains.
    With ``train_on: generated`` the training (and validation) sets are drawn from the word lists of
    ``tasks.concepts`` (the quickstart's) instead and the source gives the test sets only: training needs no references.
    """

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        source: str = HUB_NAME,
        ordered: bool = True,
        template: Optional[str] = None,
        separator: str = " ",
        train_on: Literal["source", "generated"] = "source",
        train_size: Optional[int] = None,
        val_size: int = 200,
        test_size: Optional[int] = None,
        seed: int = 0,
    ):
        """
        Args:
            batch_size: Prompts per RL step and device.
            eval_batch_size: Prompts per validation/test/predict batch.
            num_workers: DataLoader worker processes.
            source: Hub dataset name (``allenai/common_gen``); a ``.jsonl``/``.parquet`` file of rows
                ``{"concepts": [...], "references": [...]}`` (references optional) or of the hub's rows; or
                IPA's ``.json`` files (items with ``human_order``, the first order taken as the concepts).
            ordered: Ask for the concepts in the listed order (IPA's prompt); else in any order. The concepts
                are never reordered; pair with ``Coverage(ordered=true)`` to reward the order.
            template: Prompt with ``{concepts}`` (None: IPA's prompt; when not ``ordered``, its "in any order" version).
            separator: Between the concepts in the prompt (IPA: a space).
            train_on: 'source': train on the source's sets; 'generated': on concept sets drawn from the
                word lists of ``tasks.concepts``, the quickstart's (train_size of them, and val_size more for validation),
                testing on the source.
            train_size: Training sets (None: all the source has; required with 'generated').
            val_size: Validation sets.
            test_size: Test sets (None: all the held-out sets left after validation; needed for a file that
                also gives the training sets).
            seed: Seed of the splits and of the generated sets.
        """
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        check_sizes(train_size=train_size, val_size=val_size, test_size=test_size)
        self.template = template or (ORDERED_TEMPLATE if ordered else UNORDERED_TEMPLATE)
        if "{concepts}" not in self.template:
            raise ValueError(f"template must contain '{{concepts}}', got {self.template!r}")
        if train_on == "generated" and train_size is None:
            raise ValueError("train_on='generated' needs train_size: how many concept sets to draw")

    def item(self, concept_set: ConceptSet) -> dict[str, Any]:
        prompt = self.template.format(concepts=self.hparams.separator.join(concept_set["concepts"]))
        return {"prompt": prompt, "meta": {"concepts": concept_set["concepts"], "references": concept_set["references"]}}

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        rng = random.Random(hp.seed)
        is_file = Path(hp.source).suffix in (".jsonl", ".json", ".parquet")
        held_out = read_concept_sets(hp.source, "validation")  # a file: all of it
        rng.shuffle(held_out)
        if hp.train_on == "generated":
            generated = generated_sets(hp.train_size + hp.val_size, rng, exclude={frozenset(s["concepts"]) for s in held_out})
            train, val, test = generated[hp.val_size :], generated[: hp.val_size], held_out[: hp.test_size]
        elif is_file:
            if hp.test_size is None:
                raise ValueError(f"{hp.source}: a file that gives the test and the training sets needs test_size")
            val, test, train = held_out[: hp.val_size], held_out[hp.val_size :][: hp.test_size], held_out[hp.val_size + hp.test_size :]
        else:
            val, test = held_out[: hp.val_size], held_out[hp.val_size :][: hp.test_size]
            train = read_concept_sets(hp.source, "train")
            rng.shuffle(train)
        splits = {"train": train[: hp.train_size], "val": val, "test": test}  # a size of None slices all
        self.check_sizes(splits)
        self.splits = {name: [self.item(s) for s in sets] for name, sets in splits.items()}

    def check_sizes(self, splits: dict[str, list[ConceptSet]]) -> None:
        hp = self.hparams
        wanted = {"train": hp.train_size or hp.batch_size, "val": hp.val_size, "test": hp.test_size or 1}
        if short := [f"{name} {len(splits[name])} < {n}" for name, n in wanted.items() if len(splits[name]) < n]:
            raise ValueError(f"{hp.source}: not enough concept sets ({', '.join(short)}); lower train_size, val_size or test_size")
