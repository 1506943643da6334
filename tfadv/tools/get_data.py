"""Fetches CLUE and FewCLUE classification tasks into the layout the configs read.

    python -m tfadv.tools.get_data clue --tasks=tnews,iflytek --out=data/clue
    python -m tfadv.tools.get_data fewclue --tasks=tnews,iflytek,bustm,eprstmt --out=data/fewclue

Without `--out`, tasks go to `~/.cache/tfadv/data/<suite>`, where the tests
look for FewCLUE when `../shared/data/fewclue` is absent.

Each task lands in `<out>/<task>/` as `train.json`, `dev.json` (and
`test.json`, `labels.json`, `unlabeled.json` where the release has them),
which `ClueDataset.data_dir = '<out>/<task>'` (or `TextFileDataset`) reads.
`--out` may be a local path or `gs://`.

- CLUE: the public release zips (`storage.googleapis.com/cluebenchmark/tasks/
  <task>_public.zip`, as CLUE's README and baselines download them).
- FewCLUE: the files of `github.com/CLUEbenchmark/FewCLUE/datasets/<task>/`:
  `train_few_all.json` → `train.json`, `dev_few_all.json` → `dev.json`,
  `test_public.json` → `test.json`, `unlabeled.json`.

Downloads go to a local cache (`--cache_dir`) as `<file>.part` and resume
where a broken one stopped (an HTTP Range request); a server that ignores
the range starts the file over. Each file is checked before it is used: its
size against the server's Content-Length, a zip's CRCs, and its SHA-256
against `CHECKSUMS` below where one is recorded, or against
`<out>/SHA256SUMS` (written by every fetch) when that names the file, so a
second machine fetching into the same bucket gets the first one's bytes or
an error. A mismatch is one line and nothing is installed.
"""

import dataclasses
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from typing import Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top

CLUE_URL = "https://storage.googleapis.com/cluebenchmark/tasks"
FEWCLUE_URL = "https://raw.githubusercontent.com/CLUEbenchmark/FewCLUE/main/datasets"
CLUE_TASKS = ("tnews", "iflytek", "afqmc", "cmnli", "ocnli", "csl", "cluewsc2020")
FEWCLUE_TASKS = ("tnews", "iflytek", "eprstmt", "bustm", "csldcp", "ocnli", "chid",
                 "csl", "cluewsc")
# The release files kept, by the name the configs read.
CLUE_FILES = {"train.json": "train.json", "dev.json": "dev.json", "test.json": "test.json",
              "labels.json": "labels.json"}
FEWCLUE_FILES = {"train.json": "train_few_all.json", "dev.json": "dev_few_all.json",
                 "test.json": "test_public.json", "unlabeled.json": "unlabeled.json"}
REQUIRED = ("train.json", "dev.json")
# SHA-256 of release files, by URL. None recorded yet: this project's
# machines reach no network but package registries. The first fetch writes
# <out>/SHA256SUMS; add its lines here to pin the releases.
CHECKSUMS: Dict[str, str] = {}



def default_out(suite: str) -> str:
  """Where a fetch goes without --out (and where the tests look for FewCLUE)."""
  return os.path.join(os.path.expanduser("~"), ".cache", "tfadv", "data", suite)


class FetchError(RuntimeError):
  """A download that failed or does not match its checksum; one line."""


@dataclasses.dataclass
class Source:
  """Where a task's files come from."""
  task: str
  url: str             # a zip, or a directory of files
  files: Dict[str, str]  # installed name -> release name
  is_zip: bool


def sources(suite: str, tasks: List[str], base_url: Optional[str] = None) -> List[Source]:
  known = CLUE_TASKS if suite == "clue" else FEWCLUE_TASKS
  unknown = [t for t in tasks if t not in known]
  if unknown:
    raise FetchError(f"--tasks: {unknown[0]!r} is not a {suite} task; choose from "
                     f"{', '.join(known)}.")
  if suite == "clue":
    base = base_url or CLUE_URL
    return [Source(t, f"{base}/{t}_public.zip", CLUE_FILES, True) for t in tasks]
  base = base_url or FEWCLUE_URL
  return [Source(t, f"{base}/{t}", FEWCLUE_FILES, False) for t in tasks]


def download(url: str, path: str, retries: int = 3, print_fn=print) -> str:
  """Downloads `url` to `path` (resuming `path + '.part'`); returns its SHA-256."""
  partial = path + ".part"
  for attempt in range(1, retries + 1):
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
      with urllib.request.urlopen(request, timeout=60) as response:
        resumed = have and response.status == 206
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total is not None else None
        with open(partial, "ab" if resumed else "wb") as f:
          while True:
            chunk = response.read(1 << 20)
            if not chunk:
              break
            f.write(chunk)
      size = os.path.getsize(partial)
      if total is not None and size != total:
        raise FetchError(f"{url}: got {size} of {total} bytes")
      os.replace(partial, path)
      return _sha256(path)
    except urllib.error.HTTPError as e:
      if e.code == 416 and have:  # the range starts past the end: start over
        os.remove(partial)
        continue
      if e.code == 404:
        raise FetchError(f"{url}: not found (HTTP 404); check --tasks or --base_url.") from None
      error = e
    except (urllib.error.URLError, OSError, FetchError) as e:
      error = e
    kept = os.path.getsize(partial) if os.path.exists(partial) else 0
    print_fn(f"get_data: {url}: attempt {attempt} stopped at {kept} bytes ({error}); "
             + ("resuming." if attempt < retries else "giving up."))
    time.sleep(min(2 ** attempt, 10) if attempt < retries else 0)
  raise FetchError(f"{url}: download failed after {retries} attempts; rerun the same "
                   f"command to resume from {partial}.")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def read_sums(out: str) -> Dict[str, str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = f"{out.rstrip('/')}/SHA256SUMS"
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return {url: digest for digest, url in (line.split(None, 1) for line in f.read().split("\n")
                                            if line.strip())}


def write_sums(out: str, sums: Dict[str, str]) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(out)
  with tf.io.gfile.GFile(f"{out.rstrip('/')}/SHA256SUMS", "w") as f:
    f.write("".join(f"{digest}  {url}\n" for url, digest in sorted(sums.items())))


def check_sum(url: str, digest: str, sums: Dict[str, str], checksums=None) -> None:
  checksums = CHECKSUMS if checksums is None else checksums
  for expected, where in ((checksums.get(url), "tfadv's record"), (sums.get(url), "SHA256SUMS")):
    if expected and expected != digest:
      raise FetchError(f"{url}: SHA-256 {digest[:12]}… does not match {where} "
                       f"({expected[:12]}…): the server sent other bytes; nothing installed.")


def fetch(suite: str, tasks: List[str], out: str, cache_dir: str,
          base_url: Optional[str] = None, retries: int = 3, print_fn=print,
          checksums: Optional[Dict[str, str]] = None) -> Dict[str, List[str]]:
  """Fetches `tasks` into `<out>/<task>/`; returns {task: installed file names}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(cache_dir, exist_ok=True)
  sums = read_sums(out)
  installed = {}
  for source in sources(suite, tasks, base_url):
    contents = {}  # installed name -> bytes
    if source.is_zip:
      local = os.path.join(cache_dir, f"{suite}_{os.path.basename(source.url)}")
      digest = download(source.url, local, retries, print_fn)
      check_sum(source.url, digest, sums, checksums)
      sums[source.url] = digest
      with zipfile.ZipFile(local) as archive:
        broken = archive.testzip()
        if broken is not None:
          raise FetchError(f"{source.url}: {broken} fails its CRC; delete {local} and rerun.")
        by_name = {os.path.basename(n): n for n in archive.namelist() if not n.endswith("/")}
        for name, release in source.files.items():
          if release in by_name:
            contents[name] = archive.read(by_name[release])
    else:
      for name, release in source.files.items():
        url = f"{source.url}/{release}"
        local = os.path.join(cache_dir, f"{suite}_{source.task}_{release}")
        try:
          digest = download(url, local, retries, print_fn)
        except FetchError as e:
          if name in REQUIRED:
            raise
          print_fn(f"get_data: {source.task}: no {release} ({e}); skipped.")
          continue
        check_sum(url, digest, sums, checksums)
        sums[url] = digest
        with open(local, "rb") as f:
          contents[name] = f.read()
    missing = [n for n in REQUIRED if n not in contents]
    if missing:
      raise FetchError(f"{source.url}: the release has no {source.files[missing[0]]}; "
                       "nothing installed for this task.")
    directory = f"{out.rstrip('/')}/{source.task}"
    tf.io.gfile.makedirs(directory)
    for name, data in contents.items():
      with tf.io.gfile.GFile(f"{directory}/{name}", "wb") as f:
        f.write(data)
    installed[source.task] = sorted(contents)
    print_fn(f"get_data: {source.task}: {', '.join(sorted(contents))} -> {directory}")
  write_sums(out, sums)
  return installed


FLAGS = flags.FLAGS


def define_flags():
  """The tool's flags: defined when it runs, so importing `fetch` defines none
  (other tools own flags of the same names)."""
  flags.DEFINE_list("tasks", ["tnews", "iflytek"], "Tasks to fetch.")
  flags.DEFINE_string("out", None, "Where the task directories go (local or gs://); "
                      "default: the cache the tests look in, ~/.cache/tfadv/data/<suite>.")
  flags.DEFINE_string("cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "tfadv",
                                                "downloads"),
                      "Local directory of downloads (partial ones resume from here).")
  flags.DEFINE_string("base_url", None, "Another server holding the release's layout "
                      "(a mirror; tests use a local one).")
  flags.DEFINE_integer("retries", 3, "Attempts per file; each resumes where the last stopped.")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("clue", "fewclue"):
    print("usage: python -m tfadv.tools.get_data clue|fewclue --tasks=tnews,iflytek --out=DIR",
          file=sys.stderr)
    sys.exit(2)
  out = FLAGS.out or default_out(argv[1])
  try:
    fetch(argv[1], FLAGS.tasks, out, FLAGS.cache_dir, FLAGS.base_url, FLAGS.retries,
          print_fn=lambda line: print(line, flush=True))
  except FetchError as e:
    print(f"get_data: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
