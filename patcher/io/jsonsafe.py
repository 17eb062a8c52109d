"""JSON that every parser accepts: Python's json writes NaN/Infinity, which is not JSON. Non-finite
floats (an infinite SNR when two prompt sets separate perfectly, numpy scalars that are NaN) become
null, and allow_nan=False makes any that slip through an error instead of invalid output."""

import json
import math


def clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return clean(obj.item())  # numpy scalars
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(clean(obj), allow_nan=False, **kw)
