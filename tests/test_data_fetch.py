"""``python -m smear.data.fetch``: real downloads from a real local HTTP server, real zips, the real data checks.

The server (http.server in a thread) serves a mirror of the official host's paths, built here: per domain a
zip of a few 16x16 JPEGs in ``<domain>/<class>/<file>.jpg`` plus the two split files. It honours
``Range: bytes=N-`` (206, or 416 past the end), logs every request (path, Range header, bytes sent) and can
drop the connection once mid-file or serve corrupted bytes. The tests give their own digests with
``--digests`` (md5sum's format), except the one that checks the published table is used by default.
GLUE: written from a local copy of the Hub repository's layout (see ``smear.data.fetch``'s docstring for
what that does and does not exercise).
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smear.data import glue
from smear.data.check import check_domainnet
from smear.data.domainnet import DomainNetDataset
from smear.data.fetch import PUBLISHED_MD5, domainnet_files, main

DOMAINS = ("clipart", "sketch")   # clipart.zip lives under groundtruth/ on the official host, sketch.zip does not
CHUNK = 10 * 1024 * 1024          # huggingface_hub's download chunk: a dropped transfer resumes from a whole one


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def build_mirror(pad: int = 0) -> dict[str, bytes]:
    """Path under the base URL -> bytes, for DOMAINS: three classes, two train and one test image each.
    ``pad`` adds a stored member of that many random bytes outside ``clipart/`` to clipart.zip."""
    files = {}
    for di, d in enumerate(DOMAINS):
        buf = io.BytesIO()
        lists = {"train": [], "test": []}
        with zipfile.ZipFile(buf, "w") as zf:
            for c in range(3):
                for i, split in enumerate(("train", "train", "test")):
                    rel = f"{d}/class_{c}/{d}_{c:03d}_{i:06d}.jpg"
                    zf.writestr(rel, _jpeg(100 * di + 10 * c + i))
                    lists[split].append(f"{rel} {c}\n")
            if pad and d == "clipart":
                zf.writestr("__MACOSX/padding.bin", np.random.default_rng(7).bytes(pad),
                            compress_type=zipfile.ZIP_STORED)
        paths = dict(domainnet_files(d))
        files[paths[f"{d}.zip"]] = buf.getvalue()
        for split, lines in lists.items():
            files[paths[f"{d}_{split}.txt"]] = "".join(lines).encode()
    return files


class Mirror(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` under /mirror/; ``log`` gets (path, Range header, bytes sent) per request."""

    files: dict[str, bytes] = {}
    log: list[tuple[str, str | None, int]] = []
    drop: dict[str, int] = {}        # path -> bytes to send before dropping the connection (once)
    corrupt: set[str] = set()        # paths served with one byte flipped

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.removeprefix("/mirror/")
        data = self.files.get(path)
        if data is None:
            self.send_error(404)
            return
        if path in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        rng, start = self.headers.get("Range"), 0
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.log.append((path, rng, 0))   # logged before answering: the client may be done first
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.drop.pop(path, None)
        self.log.append((path, rng, len(body) if cut is None else cut))
        if cut is not None:   # the connection breaks mid-file
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    Mirror.files, Mirror.log, Mirror.drop, Mirror.corrupt = build_mirror(), [], {}, set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/mirror/"
    httpd.shutdown()
    httpd.server_close()


def _digests(tmp_path: Path) -> Path:
    """md5sum's output for the mirror's files (by file name), as ``--digests`` takes it."""
    f = tmp_path / "MD5SUMS"
    f.write_text("".join(f"{hashlib.md5(data).hexdigest()}  {Path(p).name}\n" for p, data in Mirror.files.items()))
    return f


@pytest.fixture
def fetch(tmp_path, server, monkeypatch, capsys):
    """Run the command in this process against the server: (exit status, stdout, stderr)."""
    monkeypatch.setenv("SMEAR_CACHE_DIR", str(tmp_path / "cache"))   # the data check's per-node record

    def run(*extra: str, root: Path | None = None) -> tuple[int, str, str]:
        argv = ["domainnet", str(root or tmp_path / "dn"), "--domains", ",".join(DOMAINS), "--base-url", server,
                "--digests", str(_digests(tmp_path)), "--workers", "3", *extra]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err
    return run


def _requests(path_end: str) -> list[tuple[str, str | None, int]]:
    return [r for r in Mirror.log if r[0].endswith(path_end)]


def test_full_fetch_writes_the_official_layout_passes_the_check_and_a_second_run_downloads_nothing(
        tmp_path, server):
    root = tmp_path / "dn"
    env = dict(os.environ, SMEAR_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "smear.data.fetch", "domainnet", str(root), "--domains", ",".join(DOMAINS),
           "--base-url", server, "--digests", str(_digests(tmp_path))]
    first = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    size = sum(len(data) for data in Mirror.files.values())
    assert f"downloaded 6 of 6 files ({size / 1000:.1f} KB), 0 already present" in first.stdout
    assert "data check passed: 18 images, 3 classes" in first.stdout
    assert sorted(p for p, _, _ in Mirror.log) == sorted(Mirror.files)       # each file once, whole
    assert all(rng is None for _, rng, _ in Mirror.log)
    for d in DOMAINS:   # the official layout, and nothing left to unpack
        assert (root / f"{d}_train.txt").is_file() and (root / f"{d}_test.txt").is_file()
        assert len(list((root / d).glob("class_*/*.jpg"))) == 9
        assert not (root / ".fetch" / f"{d}.zip").exists() and not list((root / ".fetch").glob("*.part"))
    assert check_domainnet(root, DOMAINS, decode="full").images == 18
    assert len(DomainNetDataset(root, DOMAINS, "test", resolution=16)) == 6

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert len(Mirror.log) == 6, "the second run requested nothing"
    assert "nothing to download: all 6 files of clipart, sketch are present and verified (md5)" in second.stdout
    assert "data check: passed before on this node" in second.stdout


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(tmp_path, fetch):
    Mirror.files = build_mirror(pad=CHUNK + 2_000_000)   # big enough for one whole chunk before the drop
    zip_path = dict(domainnet_files("clipart"))["clipart.zip"]
    size = len(Mirror.files[zip_path])
    Mirror.drop[zip_path] = CHUNK + 1_000_000
    code, out, err = fetch()
    assert code == 0, err
    (first, second) = _requests("clipart.zip")
    assert first == (zip_path, None, CHUNK + 1_000_000)
    assert second[1] == f"bytes={CHUNK}-" and second[2] == size - CHUNK < size
    assert f"clipart.zip: unpacked into {tmp_path / 'dn' / 'clipart'}, skipped 1 member(s) outside clipart/" in out
    assert not (tmp_path / "dn" / "__MACOSX").exists()
    assert "data check passed" in out


def test_a_partial_part_file_is_resumed_with_a_range_request(tmp_path, fetch):
    zip_path = dict(domainnet_files("sketch"))["sketch.zip"]
    data = Mirror.files[zip_path]
    half = len(data) // 2
    (tmp_path / "dn" / ".fetch").mkdir(parents=True)
    (tmp_path / "dn" / ".fetch" / "sketch.zip.part").write_bytes(data[:half])
    code, out, err = fetch()
    assert code == 0, err
    assert _requests("sketch.zip") == [(zip_path, f"bytes={half}-", len(data) - half)]
    assert f"sketch.zip: downloaded ({len(data) / 1000:.1f} KB, resumed at {half / 1000:.1f} KB), md5 ok" in out
    assert len(list((tmp_path / "dn" / "sketch").glob("class_*/*.jpg"))) == 9


def test_a_complete_part_file_is_checked_not_fetched_again(tmp_path, fetch):
    zip_path = dict(domainnet_files("sketch"))["sketch.zip"]
    (tmp_path / "dn" / ".fetch").mkdir(parents=True)
    (tmp_path / "dn" / ".fetch" / "sketch.zip.part").write_bytes(Mirror.files[zip_path])
    code, out, err = fetch()
    assert code == 0, err
    assert _requests("sketch.zip") == [(zip_path, f"bytes={len(Mirror.files[zip_path])}-", 0)]   # 416


def test_a_corrupted_file_is_refused_by_its_digest_and_removed(tmp_path, fetch):
    zip_path = dict(domainnet_files("sketch"))["sketch.zip"]
    Mirror.corrupt.add(zip_path)
    good = Mirror.files[zip_path]
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    code, out, err = fetch()
    assert code == 1
    assert err.splitlines() == [f"fetch: error: sketch.zip md5 {hashlib.md5(bad).hexdigest()}: does not match the "
                                f"published digest, file removed; valid: {hashlib.md5(good).hexdigest()}"]
    root = tmp_path / "dn"
    assert not list((root / ".fetch").glob("sketch.zip*")) and not (root / "sketch").exists()
    assert (root / "clipart").is_dir() and "data check" not in out   # the good files are kept; no check yet
    Mirror.corrupt.clear()
    before = len(Mirror.log)
    code, out, err = fetch()
    assert code == 0, err
    assert [p for p, _, _ in Mirror.log[before:]] == [zip_path], "only the refused file is fetched again"
    assert "downloaded 1 of 6 files" in out and "data check passed" in out


def test_a_mirror_is_checked_against_the_published_digests_unless_digests_are_given(tmp_path, server, capsys):
    code = main(["domainnet", str(tmp_path / "dn"), "--domains", "sketch", "--base-url", server])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 3
    assert all(re.fullmatch(r"fetch: error: (\S+) md5 [0-9a-f]{32}: does not match the published digest, file "
                            r"removed; valid: ([0-9a-f]{32})", line) for line in err)
    assert {line.rsplit(" ", 1)[1] for line in err} == {PUBLISHED_MD5[n] for n, _ in domainnet_files("sketch")}


def test_a_second_fetch_into_the_same_root_is_refused_while_the_first_runs(tmp_path, fetch):
    import fcntl

    (tmp_path / "dn" / ".fetch").mkdir(parents=True)
    with open(tmp_path / "dn" / ".fetch" / "lock", "a") as held:   # what a running fetch holds
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out, err = fetch()
    assert code == 1 and Mirror.log == [] and out == ""
    assert err == (f"fetch: error: ROOT {str(tmp_path / 'dn')!r}: another fetch is writing it (it holds "
                   f"{tmp_path / 'dn' / '.fetch' / 'lock'}); valid: one fetch per ROOT at a time "
                   "(wait for it to end)\n")
    assert fetch()[0] == 0   # once it is released


@pytest.mark.parametrize("args, where", [
    (["imagenet", "{root}"], "dataset 'imagenet': is not known; valid: domainnet, glue"),
    (["domainnet", "{root}", "--domains", "clipart,photo"],
     "--domains 'photo': is not known; valid: clipart, infograph, painting, quickdraw, real, sketch"),
    (["domainnet", "{root}", "--workers", "0"], "--workers 0: is out of range; valid: 1 or more"),
    (["domainnet", "{root}", "--base-url", "ftp://mirror/dn"], "--base-url 'ftp://mirror/dn': is not an http(s) URL"),
    (["domainnet", "{root}", "--digests", "{tmp}/MD5SUMS"],
     "--digests '{tmp}/MD5SUMS': has no digest for clipart.zip"),
    (["domainnet", "{tmp}/afile/dn"], "ROOT '{tmp}/afile/dn': cannot be written (Not a directory)"),
    (["glue", "{root}", "--tasks", "rte,wnli"], "--tasks 'wnli': is not known; valid: rte, sst2, mrpc"),
    (["glue", "{tmp}/afile"], "ROOT '{tmp}/afile': cannot be written (File exists)"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, args, where):
    (tmp_path / "afile").write_text("a file, not a folder\n")
    (tmp_path / "MD5SUMS").write_text(f"{'0' * 32}  sketch.zip\n")
    code = main([a.format(root=tmp_path / "root", tmp=tmp_path) for a in args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("fetch: error: " + where.format(tmp=tmp_path)) and "; valid: " in line
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------------------------- GLUE

TASKS = ("rte", "stsb", "mnli")


def _hub_copy(glue_root: Path, dest: Path) -> Path:
    """A local copy of the Hub repository's layout: the parquet files, and a README whose ``configs`` map them
    to each config's splits, as nyu-mll/glue's README does."""
    yaml = ["---", "configs:"]
    for t in TASKS:
        shutil.copytree(glue_root / t, dest / t)
        yaml += [f"- config_name: {t}", "  data_files:"]
        yaml += [f"  - split: {s}\n    path: {t}/{s}-*" for s in glue.SPLITS[t]]
    (dest / "README.md").write_text("\n".join(yaml + ["---", "# GLUE (test copy)", ""]))
    return dest


def test_glue_writes_the_hub_layout_the_loader_reads_and_a_second_run_fetches_nothing(
        tmp_path, glue_root, monkeypatch, capsys):
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    source, root = _hub_copy(glue_root, tmp_path / "hub-copy"), tmp_path / "glue"
    code = main(["glue", str(root), "--tasks", ",".join(TASKS), "--source", str(source)])
    out = capsys.readouterr().out
    assert code == 0 and "wrote 3 of 3 tasks" in out and "data check passed: rte train" in out
    for t in TASKS:
        assert sorted(p.name for p in (root / t).iterdir()) == sorted(f"{s}-00000-of-00001.parquet"
                                                                      for s in glue.SPLITS[t])
        for s in glue.SPLITS[t]:
            ours, hubs = (pq.read_table(r / t / f"{s}-00000-of-00001.parquet") for r in (root, source))
            assert ours.schema.names == list(glue.COLUMNS[t]) and ours.equals(hubs.cast(ours.schema))
            assert ours.schema.field("label").type == hubs.schema.field("label").type
    assert not (root / ".fetch" / "hf-cache").exists()
    mixture = glue.GlueMixture(root, TASKS, "test")
    assert mixture.task_sizes() == {"rte": 100, "stsb": 100, "mnli": 150}

    shutil.rmtree(source)   # a second run must not need it
    assert main(["glue", str(root), "--tasks", ",".join(TASKS), "--source", str(source)]) == 0
    assert "nothing to fetch: all 3 tasks (rte, stsb, mnli) are present" in capsys.readouterr().out


def test_glue_from_a_source_without_the_task_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    source = tmp_path / "empty-copy"
    source.mkdir()
    code = main(["glue", str(tmp_path / "glue"), "--tasks", "rte", "--source", str(source)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and line.startswith(f"fetch: error: GLUE task 'rte' from {source}: could not be loaded (")
    assert "; valid: " in line and not (tmp_path / "glue" / "rte").exists()


def test_the_cluster_guide_and_yaml_fetch_with_commands_the_parser_takes():
    """docs/cluster.md and ray_cluster.yaml (its commented head_setup_commands) get the data with this command."""
    import shlex

    from smear.data.fetch import _parser
    from tests.helpers import REPO

    for doc in ("docs/cluster.md", "ray_cluster.yaml"):
        text = (REPO / doc).read_text()
        assert "aws s3 sync" not in text and "sync them from S3" not in text, doc
        commands = re.findall(r"python -m smear\.data\.fetch ([^'\n;]+)", text)
        assert {c.split()[0] for c in commands} == {"domainnet", "glue"}, doc
        for c in commands:
            if "ROOT" not in c:   # the examples, not the synopsis
                args = _parser().parse_args(shlex.split(c))
                assert args.root.startswith("/mnt/shared/"), (doc, c)
