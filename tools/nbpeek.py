"""Print a notebook's code cells and their text outputs (a quick review of stored outputs)."""
import json
import sys

for path in sys.argv[1:]:
    for cell in json.load(open(path))["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        print("----", src[:70].replace("\n", " | "))
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            print(f"  [{out.get('name', out['output_type'])}] {''.join(text)[:800]}")
