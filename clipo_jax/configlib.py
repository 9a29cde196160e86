"""The one helper every config uses: parse get_config's `arg` ("key=value,flag")."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'size=tiny,clipo' -> ConfigDict(size='tiny', clipo=True) over `defaults`.

    Values take the type of their default; a bare word sets a boolean flag. Unknown keys are
    an error, so a typo in the command line never silently does nothing.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; valid: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"config arg {key}={value!r} is not a {type(default).__name__}") from None
    return out
