"""
A run's shared state: paths in the output directory, the model clients (made on first use, so stages
that call no model need no key), the cache, the budget, and concurrent mapping with failure records.
"""

import asyncio
import logging
import os
import time

from tqdm import tqdm

from safety_data_workflow.llm import Budget, BudgetExceeded, ModelCallFailed, ModelClient
from nanochat.common import read_jsonl
from safety_data_workflow.store import JsonlStore, ResponseCache

logger = logging.getLogger("safety_data_workflow")


class StageInputMissing(Exception):
    """A stage needs an earlier stage's output."""


class RunContext:
    def __init__(self, config):
        self.config = config
        os.makedirs(config.out_dir, exist_ok=True)
        self.cache = ResponseCache(self.path("cache.sqlite"))
        self.budget = Budget(config.max_requests, config.max_total_tokens)
        self.failures = JsonlStore(self.path("failures.jsonl"), key=lambda r: (r["stage"], r["key"], r["time"]))
        self._semaphore = None
        self._clients = {}

    def path(self, name):
        return os.path.join(self.config.out_dir, name)

    def read(self, name, produced_by):
        path = self.path(name)
        if not os.path.exists(path):
            raise StageInputMissing(f"{path} does not exist: run `python -m safety_data_workflow {produced_by}` first")
        return read_jsonl(path)

    def client(self, role):
        """role: red_team | blue_team | judge | optimizer."""
        if role not in self._clients:
            if self._semaphore is None:  # one limit shared by every model of the run
                self._semaphore = asyncio.Semaphore(self.config.concurrency)
            self._clients[role] = ModelClient(role, getattr(self.config, role), self.config, self.cache,
                                              self.budget, self._semaphore)
        return self._clients[role]

    async def map(self, stage, items, work, key):
        """Run work(item) for every item concurrently (the semaphore bounds API calls); returns failures."""
        failed, budget_spent = 0, None
        progress = tqdm(total=len(items), desc=stage, unit="item", leave=True)

        async def one(item):
            nonlocal failed, budget_spent
            try:
                await work(item)
            except ModelCallFailed as e:
                failed += 1
                self.failures.append({"stage": stage, "key": key(item), "reason": str(e), "time": time.time()})
                logger.warning(f"{stage}: {key(item)} failed: {e}")
            except BudgetExceeded as e:  # items already in flight still finish and are saved
                budget_spent = e
            finally:
                progress.update()

        tasks = [asyncio.create_task(one(item)) for item in items]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # a configuration error (or Ctrl-C): stop the rest, keep what is written
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            progress.close()
        if budget_spent is not None:
            raise budget_spent
        return failed

    def close(self):
        self.cache.close()
