"""The planted bugs of the mutation campaign (``python -m tests.mutants.run``).

Each mutant is one exact text substitution in one file of the package.  ``old`` must occur
exactly once in the file: when the code it names moves or changes, the runner refuses the
mutant loudly (``python -m tests.mutants.run --check`` checks every one in a second) and the
entry here has to be placed again.  ``new`` is the bug a careful reviewer would plant there:
small, plausible, and wrong.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    file: str  # relative to the repository root
    old: str
    new: str


MUTANTS: list[Mutant] = [
    # -- staging ----------------------------------------------------------------------------
    Mutant(
        "stage_first_chunk_only",
        "save copies only the first chunk_bytes of each CPU tensor into the slot",
        "flashckpt/staging/stager.py",
        """                _foreach_copy([d for d, _ in host], [s for _, s in host])
""",
        """                _n = max(1, self.opts.chunk_bytes // 8)
                _foreach_copy([d.reshape(-1)[:_n] for d, _ in host], [s.reshape(-1)[:_n] for _, s in host])
""",
    ),
    Mutant(
        "memory_manifest_cache_ignores_bytes",
        "the memory tier returns a manifest decoded earlier without checking the record is the same bytes",
        "flashckpt/staging/memory_tier.py",
        """    if known is not None and known[0] == raw:""",
        """    if known is not None:""",
    ),
    Mutant(
        "save_slot_leak_on_exception",
        "save does not give the slot back when something raises after it was taken",
        "flashckpt/coordination/save.py",
        """        except BaseException:  # whatever it is, the slot goes back and says nothing
            p.mem.forget(slot)
            p.stager.release(slot)
            raise""",
        """        except BaseException:  # whatever it is, the slot goes back and says nothing
            p.mem.forget(slot)
            raise""",
    ),
    Mutant(
        "save_keeps_old_memory_manifest",
        "save overwrites a slot without first deleting the memory manifest of what it held",
        "flashckpt/coordination/save.py",
        """            p.mem.reclaim(slot, p.opts.coord_timeout_s)  # its bytes are about to change
""",
        "",
    ),
    # -- persist thread ---------------------------------------------------------------------
    Mutant(
        "slot_never_released",
        "the persist thread never gives a slot back after a job",
        "flashckpt/coordination/worker.py",
        """            self.stager.release(job.slot)
            released = True""",
        """            released = True""",
    ),
    Mutant(
        "checksum_prefix_only",
        "a fresh chunk's checksum covers only its first 4 KiB (content address and manifest)",
        "flashckpt/transfer/writer.py",
        """                d = checksum(slot.view(src.at, src.stored_nbytes))
""",
        """                d = checksum(slot.view(src.at, min(4096, src.stored_nbytes)))
""",
    ),
    Mutant(
        "hash_wrong_bytes",
        "the whole-slot checksum pass (dedup, seal_now) hashes each chunk's size from offset 0",
        "flashckpt/transfer/writer.py",
        "digests = run_all(self.pool, lambda c: checksum(slot.view(c.offset, c.nbytes)), m.chunks)",
        "digests = run_all(self.pool, lambda c: checksum(slot.view(0, c.nbytes)), m.chunks)",
    ),
    Mutant(
        "commit_before_manifest",
        "a rank-own tier's commit record is written before the shard's manifest",
        "flashckpt/coordination/worker.py",
        """        entry = self.commits.write_manifest(tier, out)
        self.reuse.remember(tier, out)
        self.commits.commit_own(tier, out, entry)
""",
        """        from flashckpt.format import checksum, encode_manifest

        _data = encode_manifest(out)
        _key = manifest_key(out.step, out.rank, out.world_size)
        self.commits.commit_own(tier, out, (_key, len(_data), checksum(_data)))
        self.commits.write_manifest(tier, out)
        self.reuse.remember(tier, out)
""",
    ),
    Mutant(
        "resave_without_uncommit",
        "re-saving a step number writes over it without deleting its commit record first",
        "flashckpt/coordination/worker.py",
        """        self.commits.uncommit(tier, m.step)
""",
        "",
    ),
    Mutant(
        "failed_tier_keeps_manifest",
        "a tier that fails does not remove the shard's manifest it may have written",
        "flashckpt/coordination/worker.py",
        """            p._discard(tier, self.m)
""",
        "",
    ),
    Mutant(
        "retention_exception_escapes",
        "retention catches only CorruptCheckpointError: a storage error escapes to the loop's last guard",
        "flashckpt/coordination/worker.py",
        "        except Exception as exc:  # retention failing never fails a save, nor the thread",
        "        except CorruptCheckpointError as exc:  # (a StorageError now escapes)",
    ),
    Mutant(
        "dedup_checksum_trusted",
        # (Run 2026-12-01: dropping only the checksum comparison survived the suite, and is
        # equivalent: the key comparison below it derives the key from this chunk's checksum,
        # so an entry for other content is refused all the same.  Both are dropped here.)
        "a deduplicated save references the owner's chunk without checking it is this content",
        "flashckpt/coordination/dedup.py",
        """            and got[0] == src.checksum
            and isinstance(got[3], str)
            and CODEC_PATTERN.fullmatch(got[3])
            and got[1] == chunk_key(src.checksum, got[3], got[2])
""",
        """            and isinstance(got[3], str)
            and CODEC_PATTERN.fullmatch(got[3])
""",
    ),
    Mutant(
        "durable_despite_failure",
        "a slot is marked durable (free to overwrite) even when a tier failed",
        "flashckpt/coordination/worker.py",
        """            if job.tiers and len(committed) == len(job.tiers) and not job.handle.failures:
                self.stager.mark_durable(job.slot, job.generation)
            # Waiting""",
        """            if job.tiers:
                self.stager.mark_durable(job.slot, job.generation)
            # Waiting""",
    ),
    Mutant(
        "retry_never_retries",
        "a retryable storage error is raised at the first attempt",
        "flashckpt/transfer/store.py",
        "            if not exc.retryable or attempt == opts.retries:",
        "            if True:",
    ),
    # -- local backend ----------------------------------------------------------------------
    Mutant(
        "data_fsync_skipped",
        "LocalBackend.put renames the temporary file into place without fsyncing its data",
        "backends/_files.py",
        """            if self._fsync:
                os.fsync(fd)
""",
        "",
    ),
    Mutant(
        "dir_fsync_skipped",
        "LocalBackend.put does not fsync the directory after the rename",
        "backends/local.py",
        """            if self._fsync:
                fsync_dir(path.parent)
""",
        "",
    ),
    Mutant(
        "o_nofollow_dropped",
        "open_private (slots, memory manifests, lock) opens without O_NOFOLLOW",
        "flashckpt/_secure.py",
        "flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY",
        "flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY",
    ),
    # -- restore ----------------------------------------------------------------------------
    Mutant(
        "restore_memory_unverified",
        "a memory (or mirror) snapshot whose chunk fails its checksum is used anyway",
        "flashckpt/transfer/reader.py",
        """        if digest != c.checksum:
""",
        """        if False and digest != c.checksum:
""",
    ),
    Mutant(
        "restore_storage_unverified",
        "a chunk read from local/storage is not checked against its checksum",
        "flashckpt/transfer/reader.py",
        """        if checksum(view) != c.checksum:
""",
        """        if False and checksum(view) != c.checksum:
""",
    ),
    Mutant(
        "commit_entry_digest_unchecked",
        "a manifest is not checked against the size and checksum its commit record lists",
        "flashckpt/coordination/inventory.py",
        """    if len(mraw) != entry[1] or checksum(mraw) != entry[2]:
""",
        """    if False:
""",
    ),
    Mutant(
        "record_size_bound_skipped",
        "read_record reads an object of any size (the 1 GiB record bound is not checked)",
        "flashckpt/transfer/reader.py",
        """    if size > MAX_RECORD_BYTES:
""",
        """    if False:
""",
    ),
    Mutant(
        "restore_generation_not_raised",
        "restore does not raise the generation above what it saw: a rollback resumes the old run",
        "flashckpt/coordination/timeline.py",
        """        self.gen = max(self.gen, newest_gen + 1)
        self.prev, self.prev_saved = order[1], False
""",
        """        self.prev, self.prev_saved = order[1], False
""",
    ),
    Mutant(
        "abandoned_filter_skipped",
        "restore may pick a snapshot of an abandoned timeline",
        "flashckpt/coordination/plan.py",
        """    left = abandoned([(o, known.get(o, ())) for o in set().union(*every)])
""",
        """    left: set[Order] = set()
""",
    ),
    # -- retention --------------------------------------------------------------------------
    Mutant(
        "retention_keeps_one_fewer",
        "retention keeps keep-1 steps (plus the protected ones)",
        "flashckpt/coordination/retention.py",
        "    kept_records = current[-keep:] + [r for r in current[:-keep] if r.step in protect]",
        """    kept_records = current[len(current) - keep + 1 :] + [
        r for r in current[: len(current) - keep + 1] if r.step in protect
    ]""",
    ),
    Mutant(
        "retention_keeps_one_more",
        "retention keeps keep+1 steps",
        "flashckpt/coordination/retention.py",
        "    kept_records = current[-keep:] + [r for r in current[:-keep] if r.step in protect]",
        """    kept_records = current[-(keep + 1) :] + [
        r for r in current[: -(keep + 1)] if r.step in protect
    ]""",
    ),
    Mutant(
        "retention_keeps_oldest",
        "retention keeps the oldest keep steps: newer unprotected ones are deleted",
        "flashckpt/coordination/retention.py",
        "    kept_records = current[-keep:] + [r for r in current[:-keep] if r.step in protect]",
        "    kept_records = current[:keep] + [r for r in current[keep:] if r.step in protect]",
    ),
    Mutant(
        "gc_while_ranks_write",
        "the shared tier's chunk GC runs after the outcome is published, while ranks write the next step",
        "flashckpt/coordination/worker.py",
        """        if job.writers is None:  # every rank wrote its shard and waits: no writer runs
            p._collect_shared(tier, job)
        p.commits.publish(ckey, "ok")""",
        """        p.commits.publish(ckey, "ok")
        if job.writers is None:
            p._collect_shared(tier, job)""",
    ),
    Mutant(
        "memory_manifest_check_returns_early",
        "format.check_memory_manifest returns before checking anything",
        "flashckpt/format/manifest.py",
        """    slots = {c.key for c in m.chunks if c.key in SLOT_NAMES}
    others = {c.key for c in m.chunks} - slots
""",
        """    slots = {c.key for c in m.chunks if c.key in SLOT_NAMES}
    others = {c.key for c in m.chunks} - slots
    return next(iter(slots), SLOT_NAMES[0])
""",
    ),
    Mutant(
        "late_seal_overwrites",
        "a late seal overwrites the memory manifest of a newer snapshot of the same step",
        "flashckpt/staging/memory_tier.py",
        """            if slot.step != m.step:
                return False
            self.backend.put""",
        """            self.backend.put""",
    ),
    # -- mirror transport -------------------------------------------------------------------
    Mutant(
        "mirror_client_skips_server_proof",
        "the mirror client does not check the server's HMAC proof",
        "flashckpt/replication/wire.py",
        '    if not hmac.compare_digest(proof, _derive(secret, b"server proof", nc, ns)):',
        '    if False and not hmac.compare_digest(proof, _derive(secret, b"server proof", nc, ns)):',
    ),
    Mutant(
        "mirror_server_skips_client_proof",
        "the mirror server does not check the client's HMAC proof",
        "flashckpt/replication/wire.py",
        '    if not hmac.compare_digest(proof, _derive(secret, b"client proof", nc, ns)):',
        '    if False and not hmac.compare_digest(proof, _derive(secret, b"client proof", nc, ns)):',
    ),
    Mutant(
        "mirror_data_tag_unchecked",
        "a data frame's Poly1305 tag is not checked (its frame counter still advances)",
        "flashckpt/replication/wire.py",
        """                    self._verify(b"D", tag, dst)
""",
        """                    self._in += 1
""",
    ),
    Mutant(
        "mirror_get_ignores_want",
        "a mirror server answers a fetch of some chunks with every chunk its copy holds",
        "flashckpt/replication/server.py",
        """                    chunks = wanted(m, want)
""",
        """                    chunks = wanted(m, None)
""",
    ),
    Mutant(
        "mirror_push_whole_despite_split",
        "a rank whose snapshot is split across its node pushes its peer the whole shard",
        "flashckpt/coordination/mirrors.py",
        """        mine = memory_manifest(m, slot.name, parts=True)
""",
        """        mine = memory_manifest(m, slot.name)
""",
    ),
]

BY_NAME = {m.name: m for m in MUTANTS}
assert len(BY_NAME) == len(MUTANTS), "mutant names must be unique"
