"""Fetch the paper's data, one command each: DomainNet from its official host, GLUE from the Hugging Face Hub.

    python -m smear.data.fetch domainnet ROOT [--domains clipart,real,...] [--base-url URL] [--digests FILE]
                                              [--workers N]
    python -m smear.data.fetch glue ROOT [--tasks rte,sst2,...] [--source nyu-mll/glue]

**domainnet** writes the official layout that ``smear.data.domainnet`` reads, ``ROOT/<domain>_{train,test}.txt``
and ``ROOT/<domain>/<class>/<file>.jpg``, for the chosen domains (default: all six). The files are the
cleaned-version zips and split files linked from http://ai.bu.edu/M3SDA/. Each one is downloaded through
``smear.data.download`` (resumable from a ``.part`` with HTTP Range, a thread pool of ``--workers``, a
progress bar on a terminal) and checked against its published MD5. A zip is downloaded to ``ROOT/.fetch/``,
unpacked into ROOT as soon as it is verified (only its ``<domain>/`` members, while the others still
download), then deleted; ``ROOT/.fetch/<domain>.zip.md5`` records that it was. A second run transfers
nothing and says so. Last, the data check (``smear.data.check``: every
split line, label and image header) runs on ROOT. It is skipped when this node already passed the same
split files. ``--base-url`` takes the same paths from a mirror of http://csr.bu.edu/ftp/visda/2019/multi-source/.
The digests stay the published ones unless ``--digests FILE`` gives others, as lines ``<md5>  <file name>``
(what ``md5sum`` prints).

**glue** writes the Hub layout that ``smear.data.glue`` reads, ``ROOT/<task>/<split>-00000-of-00001.parquet``,
for the chosen tasks (default: the eight of ``glue.TASKS``), with every split of the task's config. It reads
them through ``datasets.load_dataset(SOURCE, task)`` and writes them with ``Dataset.to_parquet``, so the
columns and ClassLabel features are the Hub's. A task folder that already holds its splits is kept. Last,
``glue.load_raw`` reads every task back and checks its columns. ``--source`` is a Hub dataset id (default
``nyu-mll/glue``; ``HF_ENDPOINT`` names a Hub mirror) or a local folder holding a copy of that repository.
*What was exercised:* the tests run this path from a local folder in the repository's layout (parquet
files, a README whose ``configs`` map the files to splits). That covers ``datasets``' config resolution,
split names, features, the writing, the skip and the check. *Not exercised:* the Hub itself (no network
here). That leaves out resolving ``nyu-mll/glue`` over HTTP and the real README's configs. They are
assumed to match what the tests write, as the Hub shows them.

Exit status: 0 done. 1 when a file failed to download or verify, or the data check failed: one line each,
e.g. ``fetch: error: clipart.zip md5 <found>: does not match the published digest, file removed; valid:
<published>``. 2 for bad input, with one line ``fetch: error: <where> <value>: <reason>; valid: <choices>``
and nothing written.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from smear.data import glue
from smear.data.domainnet import DOMAINS, DataError
from smear.data.download import Outcome, Remote, download_all

DATASETS = ("domainnet", "glue")
OFFICIAL_BASE = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
STAGING = ".fetch"   # ROOT/.fetch: zips and .part files while they download, and the unpacked-zip records

# MD5 of DomainNet's files (cleaned version). The M3SDA page publishes none. These are the digests that two
# maintained dataset libraries ship and check, and they agree on all 18 files: awslabs/Renate
# (src/renate/benchmark/datasets/vision_datasets.py, DomainNetDataModule.md5s, after its fix of a
# painting/quickdraw mix-up) and the DomainNet loader of the "ddg" domain-generalisation toolbox
# (DomainNet.download_data). The six zips' digests also match the ImageNet-D tasks of the shifthappens
# benchmark. They were not checked against the files themselves: no machine here reaches csr.bu.edu.
PUBLISHED_MD5 = {
    "clipart.zip": "cd0d8f2d77a4e181449b78ed62bccf1e",
    "clipart_train.txt": "b4349693a7f9c05c53955725c47ed6cb",
    "clipart_test.txt": "f5ddbcfd657a3acf9d0f7da10db22565",
    "infograph.zip": "720380b86f9e6ab4805bb38b6bd135f8",
    "infograph_train.txt": "379b50054f4ac2018dca4f89421b92d9",
    "infograph_test.txt": "779626b50869edffe8ea6941c3755c71",
    "painting.zip": "1ae32cdb4f98fe7ab5eb0a351768abfd",
    "painting_train.txt": "7db0e7ca73ad9982f6e1f7f3ef372c0a",
    "painting_test.txt": "232b35dc53f26d414686ae579e38d9b5",
    "quickdraw.zip": "bdc1b6f09f277da1a263389efe0c7a66",
    "quickdraw_train.txt": "b732ced3939ac8efdd8c0a889dca56cc",
    "quickdraw_test.txt": "c1a828fdfe216fb109f1c0083a252c6f",
    "real.zip": "dcc47055e8935767784b7162e7c7cca6",
    "real_train.txt": "8ebf02c2075fadd564705f0dc7cd6291",
    "real_test.txt": "6098816791c3ebed543c71ffa11b9054",
    "sketch.zip": "658d8009644040ff7ce30bb2e820850f",
    "sketch_train.txt": "1233bd18aa9a8a200bf4cecf1c34ef3e",
    "sketch_test.txt": "d8a222e4672cfd585298aa14d02ea441",
}
_GROUNDTRUTH = ("clipart", "painting")   # the two zips the M3SDA page links under groundtruth/


class BadInput(Exception):
    """Bad input: one line ``<where> <value>: <reason>; valid: <choices>`` (exit 2, nothing written)."""

    def __init__(self, where: str, value: object, reason: str, valid: str):
        shown = repr(value) if isinstance(value, str) else str(value)
        super().__init__(f"{where} {shown}: {reason}; valid: {valid}")


def _error(message: str) -> None:
    """One line on stderr (line breaks inside a value are shown escaped)."""
    print("fetch: error: " + message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def domainnet_files(domain: str) -> list[tuple[str, str]]:
    """(file name, its path under the host's base URL) for one domain: the zip, then the two split files."""
    zip_path = f"groundtruth/{domain}.zip" if domain in _GROUNDTRUTH else f"{domain}.zip"
    return [(f"{domain}.zip", zip_path)] + [(f"{domain}_{s}.txt", f"domainnet/txt/{domain}_{s}.txt")
                                           for s in ("train", "test")]


def read_digests(path: str) -> dict[str, str]:
    """A ``--digests`` file: ``<md5>  <file name>`` lines (``md5sum``'s output; ``*`` before the name allowed)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput("--digests", path, f"cannot be read ({getattr(e, 'strerror', None) or e})",
                       "a text file of '<md5>  <file name>' lines") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            m = re.fullmatch(r"([0-9a-fA-F]{32}) [ *](.+)", line.strip())
            if not m:
                raise BadInput(f"--digests {path} line {n}", line.strip()[:120], "is not '<md5>  <file name>'",
                               "32 hex digits, two spaces, the file name (md5sum's output)")
            out[Path(m.group(2)).name] = m.group(1).lower()
    return out


def _names(value: str, flag: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of known names, each once, in the given order."""
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    for v in names or ("",):
        if v not in known:
            raise BadInput(flag, v, "is not known" if v else "is empty", ", ".join(known))
    return names


def _check_root(root: Path) -> None:
    """ROOT exists (created if not) and takes a file; the last check, so bad input writes nothing else."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise BadInput("ROOT", str(root), f"cannot be written ({e.strerror or e})",
                       "a folder this user can create and write to") from None


@contextmanager
def _only_writer(root: Path) -> Iterator[bool]:
    """Hold ``ROOT/.fetch/lock`` (flock) for the run; False, after one line, when another fetch holds it."""
    (root / STAGING).mkdir(exist_ok=True)
    with open(root / STAGING / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _error(f"ROOT {str(root)!r}: another fetch is writing it (it holds {lock.name}); valid: one fetch "
                   "per ROOT at a time (wait for it to end)")
            yield False
            return
        yield True


# ---------------------------------------------------------------------------------------------- DomainNet

def _record(root: Path, domain: str) -> Path:
    return root / STAGING / f"{domain}.zip.md5"


def _unpacked(root: Path, domain: str, md5: str) -> bool:
    record = _record(root, domain)
    return record.is_file() and record.read_text().strip() == md5 and (root / domain).is_dir()


def _unpack(archive: Path, root: Path, domain: str, md5: str) -> int:
    """Extract the zip's ``<domain>/`` members into ROOT, record it, delete it; the number of other members."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        ours = [n for n in names if n.startswith(f"{domain}/")]
        zf.extractall(root, members=ours)   # zipfile drops absolute paths and ".." from member names
    _record(root, domain).write_text(md5 + "\n")
    archive.unlink()
    return len(names) - len(ours)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _say(outcome: Outcome) -> None:
    if outcome.status == "downloaded":
        resumed = f", resumed at {_size(outcome.resumed_at)}" if outcome.resumed_at else ""
        tqdm.write(f"{outcome.remote.name}: downloaded ({_size(outcome.size)}{resumed}), "
                   "md5 ok")


def fetch_domainnet(root: Path, domains: tuple[str, ...], *, base_url: str = OFFICIAL_BASE,
                    digests: dict[str, str] = PUBLISHED_MD5, workers: int = 6) -> int:
    """Download, verify and unpack ``domains`` into ROOT, then check it (see the module docstring); exit status."""
    from smear.data.check import check_domainnet_once

    base = base_url.rstrip("/") + "/"
    remotes, done = [], 0
    for d in domains:
        for name, rel in domainnet_files(d):
            if name.endswith(".zip") and _unpacked(root, d, digests[name]):
                done += 1
                continue
            dest = root / STAGING / name if name.endswith(".zip") else root / name
            remotes.append(Remote(name, base + rel, digests[name], dest))
    problems: list[str] = []

    def finished(o: Outcome) -> None:   # in the worker thread: a zip is unpacked while the others download
        _say(o)
        if o.status == "failed" or not o.remote.name.endswith(".zip"):
            return
        d = o.remote.name.removesuffix(".zip")
        try:
            n = _unpack(o.remote.dest, root, d, o.remote.md5)
        except (OSError, zipfile.BadZipFile) as e:
            problems.append(f"{o.remote.name} {str(root / d)!r}: cannot be unpacked ({_why(e)}); valid: free space "
                            "and a writable ROOT (run again: a verified zip is kept until it is unpacked)")
            return
        others = f", skipped {n} member(s) outside {d}/" if n else ""
        tqdm.write(f"{o.remote.name}: unpacked into {root / d}{others}")

    outcomes = download_all(remotes, workers, report=finished) if remotes else []
    fetched = [o for o in outcomes if o.status == "downloaded"]
    failed = [o for o in outcomes if o.status == "failed"]
    total, present = done + len(outcomes), done + sum(o.status == "present" for o in outcomes)
    if not fetched and not failed:
        print(f"nothing to download: all {total} files of {', '.join(domains)} are present and verified (md5)")
    else:
        print(f"downloaded {len(fetched)} of {total} files ({_size(sum(o.size for o in fetched))}), {present} already "
              f"present" + (f", {len(failed)} failed" if failed else ""))
    for message in [o.error or o.remote.name for o in failed] + problems:
        _error(message)
    if failed or problems:
        return 1
    listed = sum((root / f"{d}_{s}.txt").read_bytes().count(b"\n") for d in domains for s in ("train", "test"))
    check_workers = max(1, min(os.cpu_count() or 1, listed // 2048))   # a process per 2,048 listed images at most
    try:
        summary = check_domainnet_once(root, domains, workers=check_workers)
    except DataError as e:
        _error(f"data check of {root}: {e}")
        return 1
    if summary is None:
        print(f"data check: passed before on this node for these split files ({root})")
    else:
        print(f"data check passed: {summary.images} images, {summary.num_classes} classes, "
              f"{len(domains)} domain(s) in {root} ({summary.seconds:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------------------- GLUE

def fetch_glue(root: Path, tasks: tuple[str, ...], *, source: str = glue.HUB_NAME) -> int:
    """Write ``tasks`` in the Hub layout under ROOT from ``source``, then read them back; exit status."""
    import datasets

    staging, written = root / STAGING, []
    cache = staging / "hf-cache"   # datasets' own cache for this run, removed at the end
    try:
        for t in tasks:
            try:
                glue.check_root(root, (t,))
                continue   # every split the protocol reads is there: kept
            except DataError:
                pass
            try:
                dd = datasets.load_dataset(source, t, cache_dir=str(cache))
            except Exception as e:  # noqa: BLE001 - network, missing config, auth: one line naming the task
                _error(f"GLUE task {t!r} from {source}: could not be loaded ({_why(e)}); valid: a reachable Hub "
                       f"(or HF_ENDPOINT mirror) or a local copy of {glue.HUB_NAME}")
                return 1
            tmp = staging / f"{t}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for split, d in dd.items():
                d.to_parquet(str(tmp / f"{split}-00000-of-00001.parquet"))
            if (root / t).exists():
                print(f"{t}: replacing the incomplete {root / t}")
                shutil.rmtree(root / t)
            os.replace(tmp, root / t)
            written.append(t)
            print(f"{t}: wrote {', '.join(f'{s} ({len(d)})' for s, d in dd.items())}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not written:
        print(f"nothing to fetch: all {len(tasks)} tasks ({', '.join(tasks)}) are present in {root}")
    else:
        print(f"wrote {len(written)} of {len(tasks)} tasks from {source}, {len(tasks) - len(written)} already present")
    try:
        sizes = {t: {s: len(d) for s, d in glue.load_raw(t, root).items()} for t in tasks}
    except DataError as e:
        _error(f"data check of {root}: {e}")
        return 1
    print("data check passed: " + "; ".join(f"{t} " + ", ".join(f"{s} {n}" for s, n in sz.items())
                                             for t, sz in sizes.items()))
    return 0


# ---------------------------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own prints the usage too)
        _error(message)
        self.exit(2)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m smear.data.fetch", description=__doc__.splitlines()[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="examples:\n  python -m smear.data.fetch domainnet /mnt/shared/domainnet\n"
                        "  python -m smear.data.fetch domainnet /data/dn --domains clipart,sketch --workers 4\n"
                        "  python -m smear.data.fetch glue /mnt/shared/glue\n")
    sub = ap.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    dn = sub.add_parser("domainnet", help="the official zips and split files, verified, unpacked, checked")
    dn.add_argument("root", metavar="ROOT", help="the DomainNet root to write (official layout)")
    dn.add_argument("--domains", default=",".join(DOMAINS), metavar="D[,D...]",
                    help="comma-separated (default: all six)")
    dn.add_argument("--base-url", default=OFFICIAL_BASE, metavar="URL",
                    help=f"a mirror of {OFFICIAL_BASE} (default: that host)")
    dn.add_argument("--digests", default=None, metavar="FILE",
                    help="a file of '<md5>  <file name>' lines in place of the published digests (for a mirror "
                         "that serves other files)")
    dn.add_argument("--workers", type=int, default=6, metavar="N", help="parallel downloads (default 6)")
    gl = sub.add_parser("glue", help="the Hub's nyu-mll/glue, written in the layout smear.data.glue reads")
    gl.add_argument("root", metavar="ROOT", help="the GLUE root to write (Hub layout)")
    gl.add_argument("--tasks", default=",".join(glue.TASKS), metavar="T[,T...]",
                    help="comma-separated (default: all eight)")
    gl.add_argument("--source", default=glue.HUB_NAME, metavar="ID|DIR",
                    help=f"a Hub dataset id or a local copy of it (default {glue.HUB_NAME})")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # huggingface_hub logs each retry of a transfer over several lines; the outcome is our one line per file
    logging.getLogger("huggingface_hub.file_download").setLevel(logging.ERROR)
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in DATASETS:
            raise BadInput("dataset", argv[0], "is not known", ", ".join(DATASETS))
        args = _parser().parse_args(argv)
        root = Path(args.root)
        if args.dataset == "glue":
            tasks = _names(args.tasks, "--tasks", glue.TASKS)
            _check_root(root)
            with _only_writer(root) as alone:
                return fetch_glue(root, tasks, source=args.source) if alone else 1
        domains = _names(args.domains, "--domains", DOMAINS)
        if args.workers < 1:
            raise BadInput("--workers", args.workers, "is out of range", "1 or more")
        if not re.match(r"https?://[^/\s]+", args.base_url):
            raise BadInput("--base-url", args.base_url, "is not an http(s) URL",
                           "http://HOST/PATH or https://HOST/PATH")
        digests = PUBLISHED_MD5 if args.digests is None else read_digests(args.digests)
        wanted = [name for d in domains for name, _ in domainnet_files(d)]
        missing = [name for name in wanted if name not in digests]
        if missing:
            raise BadInput("--digests", args.digests, f"has no digest for {missing[0]}",
                           f"a line for each file fetched: {', '.join(wanted)}")
        _check_root(root)
    except BadInput as e:
        _error(str(e))
        return 2
    with _only_writer(root) as alone:
        return fetch_domainnet(root, domains, base_url=args.base_url, digests=digests, workers=args.workers) \
            if alone else 1


if __name__ == "__main__":
    sys.exit(main())
