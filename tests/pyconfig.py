"""Read the plain values of an exported Python config (XTuner / OpenCompass style) without running it.

The CPU env has neither tool installed; `make sim` loads and runs the same configs with the real ones.
"""

import ast


def assignments(source: str) -> dict:
    """Top-level ``name = <literal>`` assignments."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return found


def dict_calls(source: str) -> dict[str, list[dict]]:
    """{class name: [literal keyword arguments]} of every ``dict(type=Class, ...)`` in the source."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            kind = kwargs.pop("type", None)
            name = getattr(kind, "id", None) or getattr(kind, "attr", None)
            if name:
                literal = {}
                for key, value in kwargs.items():
                    try:
                        literal[key] = ast.literal_eval(value)
                    except ValueError:
                        literal[key] = ast.unparse(value)  # a name or a call: kept as source text
                found.setdefault(name, []).append(literal)
    return found
