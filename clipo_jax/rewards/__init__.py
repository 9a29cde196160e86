"""Verifiable rewards and the reward-function registry.

A reward function has the signature ``fn(response: str, ground_truth: str, **row) -> float``;
``row`` carries the dataset example's other fields (``meta``, ``source``, ...) for rewards that
need them. Add one with::

    from clipo_jax.rewards import register_reward

    @register_reward("exact")
    def exact(response, ground_truth, **row):
        return float(response.strip() == ground_truth.strip())

and select it by name (``get_reward("exact")``), e.g. from a config string.
"""

from __future__ import annotations

from typing import Callable

RewardFn = Callable[..., float]


class UnknownRewardError(KeyError):
    """A reward name that is not registered (message lists the valid names)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name``; re-registering a name is an error."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(
                f"reward {name!r} is already registered ({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})"
            )
        _REGISTRY[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownRewardError(f"unknown reward {name!r}; valid: {', '.join(sorted(_REGISTRY))}") from None


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


# Imported after the registry exists: these modules only need names defined above.
from clipo_jax.rewards.choice import choice_reward, extract_choice  # noqa: E402
from clipo_jax.rewards.math import (  # noqa: E402
    VerifierPool,
    batch_math_reward,
    extract_answer,
    gsm8k_reward,
    last_boxed,
    math_reward,
    reset_reward_stats,
    reward_stats,
    shutdown_pools,
)

register_reward("math")(math_reward)
register_reward("choice")(choice_reward)
register_reward("gsm8k")(gsm8k_reward)

from clipo_jax.rewards.synthetic import REWARDS as _SYNTHETIC_REWARDS  # noqa: E402

for _name, _fn in _SYNTHETIC_REWARDS.items():
    register_reward(_name)(_fn)


@register_reward("rgym")
def rgym_reward(response: str, ground_truth: str, *, meta: dict | None = None, **row) -> float:
    """reasoning-gym reward: the generator's own ``score_answer`` on the extracted answer.

    Needs ``meta={"rgym_name": ..., "rgym_entry": {...}}`` as written by
    ``clipo_jax.data.datasets.reasoning_gym_examples``. Answer: last box, else ``<answer>`` tag,
    else the text after ``</think>``.
    """
    import re

    import reasoning_gym  # optional dependency, imported on use

    if not meta or "rgym_name" not in meta or "rgym_entry" not in meta:
        raise ValueError(
            "rgym reward: row meta lacks 'rgym_name'/'rgym_entry' (examples must come from reasoning_gym_examples)"
        )
    ans = extract_answer(response)
    if ans is None:
        from clipo_jax.rewards.math import strip_thinking

        text = strip_thinking(response)
        if text is None:
            return 0.0
        tags = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
        ans = tags[-1].strip() if tags else text.strip()
    score = reasoning_gym.get_score_answer_fn(meta["rgym_name"])(ans, meta["rgym_entry"])
    return float(score)


__all__ = [
    "RewardFn",
    "UnknownRewardError",
    "VerifierPool",
    "batch_math_reward",
    "choice_reward",
    "extract_answer",
    "extract_choice",
    "get_reward",
    "gsm8k_reward",
    "last_boxed",
    "list_rewards",
    "math_reward",
    "register_reward",
    "reset_reward_stats",
    "reward_stats",
    "rgym_reward",
    "shutdown_pools",
]
