"""`apr data code-corpus [-o DIR]`: the offline training corpus (the Python standard library's sources, PSF)."""

from __future__ import annotations

import json


def setup_parser(p):
    sub = p.add_subparsers(dest="data_command", metavar="KIND", required=True)
    c = sub.add_parser("code-corpus", help="copy the Python standard library's .py sources (licence PSF-2.0) into a "
                                           "corpus folder with a manifest (files, sha256, python version, licence)",
                       description="Build a code corpus every machine has: the running Python's standard library "
                                   "sources (tests and site-packages excluded), with manifest.json and a fingerprint.")
    c.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="corpus folder (default $APR_HOME/corpora/python-stdlib-X.Y)")
    c.add_argument("--source", default=None, metavar="DIR", help="a stdlib folder to read instead of this Python's")
    c.add_argument("--force", action="store_true", help="rebuild even if DIR already holds a corpus")
    c.add_argument("--json", action="store_true", help="print the manifest summary as one JSON object")


def main(args):
    from pathlib import Path

    from apr.errors import AprError
    from apr.train import data as D

    out = Path(args.out) if args.out else D.default_corpus_dir()
    if (out / D.MANIFEST).is_file() and not args.force:
        manifest = json.loads((out / D.MANIFEST).read_text())
        D.open_corpus(out)  # checks every file against its sha256
    else:
        if out.exists() and any(out.iterdir()) and not (out / D.MANIFEST).is_file():
            raise AprError(f"{out} exists and is not a corpus folder; choose an empty or new -o DIR")
        try:
            manifest = D.build_code_corpus(out, Path(args.source) if args.source else None)
        except OSError as e:
            raise AprError(f"cannot write the corpus to {out}: {e.strerror or e}") from None
    # the fingerprint of the files as they are now (open_corpus checked each against its sha256), not the stored field
    info = {k: v for k, v in manifest.items() if k != "files"} | {"dir": str(out), "fingerprint": D.fingerprint(manifest["files"])}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['dir']}: {info['n_files']} files, {info['bytes'] / 1e6:.1f} MB, python {info['python_version']}, "
              f"licence {info['licence']}, fingerprint {info['fingerprint'][:16]}")
    return 0
