"""Where two JSON values differ, for refusals that name each changed field (a resumed run's
recipe, an eval run's settings)."""

from __future__ import annotations

from typing import Any


def json_differences(
    before: Any, now: Any, path: str = "", into_lists: bool = True
) -> list[tuple[str, Any, Any]]:
    """(dotted path, value before, value now) of each place where `before` and `now` differ.

    Objects are compared key by key; lists of one length item by item when `into_lists`, an item
    that is an object with the same "name" on both sides showing it ("stages[0] (moe).max_steps").

    Example:
        >>> json_differences({"a": [1, {"name": "s", "b": 2}], "c": 0}, {"a": [1, {"name": "s", "b": 3}]})
        [('a[1] (s).b', 2, 3), ('c', 0, None)]
        >>> json_differences({"a": [1, 2]}, {"a": [1, 3]}, into_lists=False)
        [('a', [1, 2], [1, 3])]
    """
    if isinstance(before, dict) and isinstance(now, dict):
        keys = list(before) + [key for key in now if key not in before]
        return [
            found
            for key in keys
            for found in json_differences(
                before.get(key), now.get(key), f"{path}.{key}" if path else str(key), into_lists
            )
        ]
    if into_lists and isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        found = []
        for i, (b, n) in enumerate(zip(before, now, strict=True)):
            named = isinstance(b, dict) and isinstance(n, dict) and "name" in b and b["name"] == n.get("name")
            found += json_differences(b, n, f"{path}[{i}]" + (f" ({b['name']})" if named else ""), into_lists)
        return found
    return [] if before == now else [(path, before, now)]
