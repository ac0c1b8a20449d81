"""Write the ``openAPIV3Schema`` of one version of a CustomResourceDefinition as a JSON file.

    python deploy/schemas/extract_crd_schema.py CRD.yaml VERSION OUT.json \
        --repository kedacore/keda --ref v2.20.2 --commit COMMIT --path config/crd/bases/keda.sh_scaledobjects.yaml

How the files in this folder were made: the upstream CRD file, read from the named repository at the
named release tag, is parsed with PyYAML; ``spec.versions[name=VERSION].schema.openAPIV3Schema`` is
written unchanged (keys in their upstream order) with two fields added at the top: ``$comment`` (one
sentence naming the source) and ``x-tagstream-source`` (repository, tag, commit, path, version, and
this method). Validators ignore both. Nothing is removed or rewritten, so the file validates what the
API server validates from the schema, minus what JSON Schema cannot express: the API server also
rejects unknown fields (kubectl's default ``--validate=strict``), which tests/deploy_support.py's
:func:`strict_crd_schema` adds at test time, and CEL rules (``x-kubernetes-validations``), which
JSON Schema ignores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

METHOD = (
    "spec.versions[name=VERSION].schema.openAPIV3Schema of the upstream CRD file, copied unchanged "
    "by deploy/schemas/extract_crd_schema.py (PyYAML load, json.dumps); only $comment and "
    "x-tagstream-source were added"
)


def extract(crd_text: str, version: str) -> dict:
    """The openAPIV3Schema of ``version`` in a CRD document."""
    crd = yaml.safe_load(crd_text)
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit("not a CustomResourceDefinition")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise SystemExit(f"no version {version} in {crd['metadata']['name']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path, help="the upstream CRD YAML file")
    parser.add_argument("version", help="the CRD version to extract, e.g. v1alpha1")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--repository", required=True, help="upstream repository, owner/name")
    parser.add_argument("--ref", required=True, help="the release tag the file was read at")
    parser.add_argument("--commit", required=True, help="the commit of that tag")
    parser.add_argument("--path", required=True, help="the CRD file's path in the repository")
    args = parser.parse_args(argv)

    crd = yaml.safe_load(args.crd.read_text())
    schema = extract(args.crd.read_text(), args.version)
    source = {
        "repository": args.repository,
        "ref": args.ref,
        "commit": args.commit,
        "path": args.path,
        "crd": crd["metadata"]["name"],
        "version": args.version,
        "method": METHOD.replace("VERSION", args.version),
    }
    out = {
        "$comment": f"openAPIV3Schema of {crd['metadata']['name']} {args.version}, from {args.repository} "
        f"{args.ref} {args.path}, unchanged (see x-tagstream-source).",
        "x-tagstream-source": source,
        **schema,
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
