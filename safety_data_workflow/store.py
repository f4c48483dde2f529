"""
Append-only JSONL outputs that survive kill -9, and a response cache.

A record is one line, written and fsync'ed before the stage moves on. If the process dies mid-write,
the file ends in a partial line: loading cuts the file back to its last complete line, so a re-run
neither loses a completed record nor duplicates one (records are keyed, done keys are skipped).
"""

import hashlib
import json
import os
import sqlite3


class JsonlStore:
    def __init__(self, path, key):
        self.path, self.key = path, key  # key: record -> hashable identity
        self.records = {}
        if os.path.exists(path):
            self._load()

    def _load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1  # everything after the last newline is an interrupted write
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for line in data[:end].splitlines():
            if line.strip():
                record = json.loads(line)
                self.records.setdefault(self.key(record), record)

    def __contains__(self, key):
        return key in self.records

    def __len__(self):
        return len(self.records)

    def values(self):
        return list(self.records.values())

    def append(self, record):
        """Write one record durably; a key already stored is ignored (so retries cannot duplicate)."""
        key = self.key(record)
        if key in self.records:
            return False
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = record
        return True


def write_jsonl_atomic(path, records):
    """Derived files (deduplicated questions, the filtered dataset) are rewritten whole, via rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResponseCache:
    """sqlite: request fingerprint -> validated model output. A re-run never pays twice for one answer."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def fingerprint(*parts):
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key):
        row = self.db.execute("SELECT text FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key, text):
        self.db.execute("INSERT OR REPLACE INTO responses (key, text) VALUES (?, ?)", (key, text))
        self.db.commit()

    def close(self):
        self.db.close()
