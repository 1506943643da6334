"""get_data against a local HTTP server in the releases' layouts: resume, checksums, gs://-like output."""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile

import pytest
import tensorflow as tf

from tfadv.data.clue import ClueDataset
from tfadv.tools import get_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "".join(json.dumps({"label": str(100 + i % 3), "label_desc": "news_x", "sentence": f"标题{i}"},
                           ensure_ascii=False) + "\n" for i in range(50)).encode()
DEV = TRAIN[:400]


def _clue_zip():
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:  # CLUE's zips: the files at the top
    archive.writestr("train.json", TRAIN)
    archive.writestr("dev.json", DEV)
    archive.writestr("test.json", DEV)
  return buffer.getvalue()


class Server:
  """Serves {path: bytes} on 127.0.0.1 with Range support; `cut` truncates
  the first response of a path after that many bytes (a broken download)."""

  def __init__(self, files, cut=None):
    self.files, self.cut, self.requests = files, dict(cut or {}), []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):  # quiet
        pass

      def do_GET(self):  # pylint: disable=invalid-name
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
          self.send_error(404)
          return
        start = 0
        if self.headers.get("Range"):
          start = int(self.headers["Range"].split("=")[1].rstrip("-"))
          self.send_response(206)
        else:
          self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut.pop(self.path, None)
        self.wfile.write(body[:cut] if cut is not None else body)
        if cut is not None:
          self.close_connection = True

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *args):
    self.httpd.shutdown()
    self.httpd.server_close()


def test_clue_zip_resumes_a_broken_download_and_installs_what_configs_read(tmp_path):
  data = _clue_zip()
  with Server({"/tnews_public.zip": data}, cut={"/tnews_public.zip": 300}) as server:
    lines = []
    installed = get_data.fetch("clue", ["tnews"], str(tmp_path / "out"), str(tmp_path / "cache"),
                               base_url=server.url, print_fn=lines.append)
  assert installed == {"tnews": ["dev.json", "test.json", "train.json"]}
  # The second request asked for the rest only.
  assert server.requests == [("/tnews_public.zip", None), ("/tnews_public.zip", "bytes=300-")]
  assert "attempt 1 stopped at 300 bytes" in lines[0] and "resuming" in lines[0]
  ds = ClueDataset(str(tmp_path / "out" / "tnews"), labels_file=None)
  assert len(ds.examples("train")[0]) == 50 and ds.label_names() == ["100", "101", "102"]
  sums = (tmp_path / "out" / "SHA256SUMS").read_text()
  assert sums == f"{hashlib.sha256(data).hexdigest()}  {server.url}/tnews_public.zip\n"


def test_a_checksum_mismatch_installs_nothing(tmp_path):
  with Server({"/tnews_public.zip": _clue_zip()}) as server:
    url = f"{server.url}/tnews_public.zip"
    with pytest.raises(get_data.FetchError, match=r"tnews_public.zip: SHA-256 .* does not match "
                       r"tfadv's record"):
      get_data.fetch("clue", ["tnews"], str(tmp_path / "out"), str(tmp_path / "cache"),
                     base_url=server.url, checksums={url: "0" * 64}, print_fn=lambda _: None)
    assert not (tmp_path / "out" / "tnews").exists()
    # A bucket fetched before pins the bytes for the next machine, too.
    (tmp_path / "pinned").mkdir()
    (tmp_path / "pinned" / "SHA256SUMS").write_text(f"{'1' * 64}  {url}\n")
    with pytest.raises(get_data.FetchError, match="does not match SHA256SUMS"):
      get_data.fetch("clue", ["tnews"], str(tmp_path / "pinned"), str(tmp_path / "cache2"),
                     base_url=server.url, print_fn=lambda _: None)


def test_fewclue_files_renamed_skipping_absent_optional_ones_into_a_non_local_filesystem(tmp_path):
  files = {"/bustm/train_few_all.json": TRAIN, "/bustm/dev_few_all.json": DEV}
  with Server(files) as server:
    lines = []
    out = "ram://fetched"  # through tf.io.gfile, as gs:// is
    installed = get_data.fetch("fewclue", ["bustm"], out, str(tmp_path / "cache"),
                               base_url=server.url, print_fn=lines.append)
  assert installed == {"bustm": ["dev.json", "train.json"]}
  assert tf.io.gfile.GFile(f"{out}/bustm/train.json", "rb").read() == TRAIN
  assert any("no test_public.json" in line and "skipped" in line for line in lines)


def test_unknown_task_and_missing_release_are_one_line(tmp_path):
  with pytest.raises(get_data.FetchError, match=r"'weibo' is not a clue task"):
    get_data.sources("clue", ["weibo"])
  with Server({}) as server:
    proc = subprocess.run(
        [sys.executable, "-m", "tfadv.tools.get_data", "clue", "--tasks=tnews",
         f"--out={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}",
         f"--base_url={server.url}"], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"get_data: {server.url}/tnews_public.zip: not found (HTTP 404); check --tasks or "
      "--base_url.")


def test_importing_the_tool_defines_no_flags_other_tools_own():
  """One test process imports several tools: get_data's --out, --tasks and
  --retries are defined only when it runs (write_records owns --out,
  methods_table --tasks)."""
  from tfadv.tools import write_records  # pylint: disable=g-import-not-at-top
  assert "out" in write_records.FLAGS and "retries" not in write_records.FLAGS
