"""
Extract the response schemas the server's tests validate against from OpenAI's official OpenAPI spec
(github.com/openai/openai-openapi, MIT licence), with every component they reference, into one JSON file.

python dev/openai_schemas.py path/to/openai-openapi > tests/data/openai_schemas.json

(the argument is a checkout of that repository: its openapi.json and LICENSE are read; the licence notice
goes into the output with the excerpt)
"""

import json
import os
import sys

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse"]


def references(node):
    """Names of the components a schema refers to, anywhere inside it."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        found = {ref.rsplit("/", 1)[-1]} if ref.startswith("#/components/schemas/") else set()
        return found.union(*(references(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(references(v) for v in node))
    return set()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    with open(os.path.join(sys.argv[1], "openapi.json"), encoding="utf-8") as f:
        spec = json.load(f)
    with open(os.path.join(sys.argv[1], "LICENSE"), encoding="utf-8") as f:
        licence = f.read()
    schemas = spec["components"]["schemas"]
    wanted, todo = {}, list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted[name] = schemas[name]
            todo += sorted(references(schemas[name]))
    out = {"source": "https://github.com/openai/openai-openapi (openapi.json), an excerpt", "license": licence,
           "openapi_version": spec["info"]["version"], "components": {"schemas": dict(sorted(wanted.items()))}}
    json.dump(out, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
