import * as net from "node:net";
import { setTimeout as delay } from "node:timers/promises";
import { VmenvError } from "@vmenv/rpc/errors";
import {
  type MigrationOutcome,
  type MigrationProgress,
  type MigrationSettings,
  type NbdServer,
  progressFromQuery,
  type QueryMigrate,
  uriHost,
  type VmmMigration,
} from "../migration-domain.js";
import { QmpError } from "./qmp.js";

/** The part of a QMP client migration needs. */
export interface QmpLike {
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    opts?: { timeoutMs?: number },
  ): Promise<T>;
  /** QMP events, as QmpClient emits them (optional: without them the migration is only polled). */
  on?(name: "event", listener: (e: QmpEventLike) => void): unknown;
  off?(name: "event", listener: (e: QmpEventLike) => void): unknown;
}

interface QmpEventLike {
  event: string;
  data?: Record<string, unknown>;
}

/** `query-migrate` states in which the guest runs on the destination: the source can no longer take it back. */
const POSTCOPY = ["postcopy-active", "postcopy-paused", "postcopy-recover"];

interface BlockJob {
  device: string;
  type: string;
  len: number;
  offset: number;
  ready: boolean;
  status: string;
}

/** How often a running migration is polled. */
const POLL_MS = 150;

/** Node and job names of the mirror of one disk on the source. */
const mirrorOf = (disk: string) => `mig-${disk}`;

/**
 * QEMU's live migration over QMP. Destination: `-incoming defer`, then `migrate-incoming` on a port the
 * kernel picks (read back from `query-migrate`), and optionally an NBD server (`nbd-server-start`,
 * `block-export-add` writable on each disk's node). Source: `blockdev-mirror` of each disk into the
 * destination's export until READY, `migrate` with `pause-before-switchover` so that the mirrors are
 * completed (`block-job-cancel` of a READY mirror: no pivot) while the guest is paused, then
 * `migrate-continue`. The source never loses the guest: every failure path cancels and resumes.
 */
export class QemuMigration implements VmmMigration {
  constructor(private readonly qmp: QmpLike) {}

  /**
   * Waits `ms`, or less: until QEMU reports a change of the migration's status (the `events`
   * capability). The guest is paused from the end of the migration until the destination is started,
   * so its end must be seen at once, not at the next poll.
   */
  nextChange(ms: number): Promise<void> {
    const { on, off } = this.qmp;
    if (!on || !off) return delay(ms);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        off.call(this.qmp, "event", onEvent);
        resolve();
      };
      const onEvent = (e: { event: string }) => {
        if (e.event === "MIGRATION") done();
      };
      const timer = setTimeout(done, ms);
      on.call(this.qmp, "event", onEvent);
    });
  }

  async listen(host: string): Promise<string> {
    // Post-copy needs the capability on both ends before the stream starts; a host without userfaultfd
    // refuses it, and then only pre-copy is possible.
    const postcopy = await this.qmp
      .execute("migrate-set-capabilities", { capabilities: [{ capability: "postcopy-ram", state: true }] })
      .then(
        () => true,
        () => false,
      );
    if (postcopy) this.#runInPostcopy();
    await this.qmp.execute("migrate-set-capabilities", {
      capabilities: [{ capability: "events", state: true }],
    });
    await this.qmp.execute("migrate-incoming", { uri: `tcp:${uriHost(host)}:0` });
    const q = await this.qmp.execute<{ "socket-address"?: { type: string; host?: string; port?: string }[] }>(
      "query-migrate",
    );
    const port = q["socket-address"]?.find((a) => a.type === "inet")?.port;
    if (!port) throw new Error("QEMU did not say which port it listens on for the incoming migration");
    return `tcp:${uriHost(host)}:${port}`;
  }

  /**
   * Destination: the guest runs here from the start of post-copy, the missing pages fetched on demand.
   * QEMU leaves a VM started with `-S` paused when post-copy starts (it would wait, paused on both
   * ends, until the whole of memory is here); `cont` while incoming makes QEMU start it at the switch.
   */
  #runInPostcopy(): void {
    const { on, off } = this.qmp;
    if (!on || !off) return;
    const onEvent = (e: QmpEventLike) => {
      if (e.event !== "MIGRATION") return;
      const status = String(e.data?.status);
      if (status === "postcopy-active") void this.qmp.execute("cont").catch(() => undefined);
      if (["postcopy-active", "completed", "failed", "cancelled"].includes(status))
        off.call(this.qmp, "event", onEvent);
    };
    on.call(this.qmp, "event", onEvent);
  }

  async exportDisks(host: string, diskIds: string[]): Promise<string> {
    let port = 0;
    // A free port, asked of the kernel, may be taken before QEMU binds it: then try another.
    for (let attempt = 0; ; attempt++) {
      port = await freePort(host);
      try {
        await this.qmp.execute("nbd-server-start", {
          addr: { type: "inet", data: { host, port: String(port) } },
        });
        break;
      } catch (e) {
        if (attempt >= 5 || !(e instanceof QmpError) || !/in use|bind/i.test(e.message)) throw e;
      }
    }
    try {
      for (const id of diskIds) {
        await this.qmp.execute("block-export-add", {
          type: "nbd",
          id: mirrorOf(id),
          "node-name": `d-${id}`,
          name: id,
          writable: true,
        });
      }
    } catch (e) {
      await this.stopExport().catch(() => undefined);
      throw e;
    }
    return `nbd://${uriHost(host)}:${port}`;
  }

  async stopExport(): Promise<void> {
    await this.qmp.execute("nbd-server-stop").catch((e: unknown) => {
      if (!(e instanceof QmpError) || !/not running/i.test(e.message)) throw e;
    });
  }

  async incoming(): Promise<{ status: "waiting" | "active" | "completed" | "failed"; error?: string }> {
    const [m, s] = await Promise.all([
      this.qmp.execute<QueryMigrate>("query-migrate"),
      this.qmp.execute<{ status: string }>("query-status"),
    ]);
    // In post-copy the guest runs here while memory still comes: not complete yet.
    if (
      m.status === "completed" ||
      (s.status !== "inmigrate" && m.status !== "failed" && !POSTCOPY.includes(m.status ?? ""))
    ) {
      return { status: "completed" };
    }
    if (m.status === "failed" || m.status === "cancelled")
      return { status: "failed", error: m["error-desc"] ?? m.status };
    return { status: m.status && m.status !== "none" && m.status !== "setup" ? "active" : "waiting" };
  }

  async send(req: {
    uri: string;
    storage: NbdServer | undefined;
    disks: string[];
    settings: MigrationSettings;
    wasRunning: boolean;
    onProgress: (p: MigrationProgress) => void;
    signal: AbortSignal;
  }): Promise<MigrationOutcome> {
    const { settings, signal } = req;
    const deadline =
      settings.timeoutMs === undefined ? Number.POSITIVE_INFINITY : Date.now() + settings.timeoutMs;
    const check = () => {
      signal.throwIfAborted();
      if (Date.now() > deadline) {
        throw new VmenvError(
          "deadline-exceeded",
          `the migration did not complete within ${settings.timeoutMs} ms; it was cancelled and the VM runs on here`,
          { reason: "MIGRATION_TIMEOUT" },
        );
      }
    };
    const before = await this.qmp.execute<QueryMigrate>("query-migrate");
    if (
      before.status &&
      ["setup", "active", "pre-switchover", "device", "postcopy-active"].includes(before.status)
    ) {
      throw new VmenvError("failed-precondition", "a migration of this VM is already in progress", {
        reason: "MIGRATION_IN_PROGRESS",
      });
    }
    const mirrors: string[] = [];
    const storage = { transferred: 0, total: 0 };
    let started = false;
    try {
      // 1. Storage: mirror each disk into the destination's export while the guest runs.
      if (req.storage) {
        for (const id of req.disks) {
          await this.qmp.execute("blockdev-add", {
            driver: "nbd",
            "node-name": mirrorOf(id),
            server: req.storage,
            export: id,
          });
          mirrors.push(id);
          await this.qmp
            .execute("blockdev-mirror", {
              "job-id": mirrorOf(id),
              device: `d-${id}`,
              target: mirrorOf(id),
              sync: "full",
            })
            .catch((e: unknown) => {
              if (e instanceof QmpError && /cannot find|not found/i.test(e.desc)) {
                throw new VmenvError(
                  "failed-precondition",
                  `disk ${id} is not a block node of this QEMU (a vhost-user-blk disk?); its contents cannot be copied`,
                  { reason: "DISK_NOT_COPYABLE", metadata: { device: id } },
                );
              }
              throw e;
            });
        }
        for (;;) {
          check();
          const jobs = await this.#jobs(mirrors);
          storage.transferred = jobs.reduce((s, j) => s + j.offset, 0);
          storage.total = jobs.reduce((s, j) => s + j.len, 0);
          req.onProgress({ ...progressFromQuery({ status: "setup" }, storage), phase: "storage" });
          if (jobs.length === mirrors.length && jobs.every((j) => j.ready)) break;
          await delay(POLL_MS);
        }
      }
      // 2. Memory: pre-copy (post-copy when asked and pre-copy does not converge).
      await this.qmp.execute("migrate-set-capabilities", {
        capabilities: [
          { capability: "auto-converge", state: settings.autoConverge },
          { capability: "postcopy-ram", state: settings.postCopy },
          { capability: "pause-before-switchover", state: req.storage !== undefined },
          { capability: "events", state: true },
        ],
      });
      // The cap holds for the whole stream: QEMU lifts `max-bandwidth` in post-copy unless
      // `max-postcopy-bandwidth` is set too.
      const cap = settings.maxBandwidthBytesPerSecond;
      await this.qmp.execute("migrate-set-parameters", {
        "downtime-limit": settings.downtimeLimitMs,
        ...(cap
          ? { "max-bandwidth": cap, ...(settings.postCopy ? { "max-postcopy-bandwidth": cap } : {}) }
          : {}),
      });
      await this.qmp.execute("migrate", { uri: req.uri });
      started = true;
      let postcopy = false;
      /** The mirrors completed at switchover. */
      let mirrored = false;
      let bestRemaining = Number.POSITIVE_INFINITY;
      let stalled = 0;
      for (;;) {
        // Once post-copy started, the guest runs on the destination: no cancel or timeout any more.
        if (!postcopy) check();
        const q = await this.qmp.execute<QueryMigrate>("query-migrate");
        if (mirrors.length > 0 && !mirrored && q.status !== "completed") {
          const jobs = await this.#jobs(mirrors);
          storage.transferred = jobs.reduce((s, j) => s + j.offset, 0);
        }
        const p = progressFromQuery(q, storage);
        // Post-copy starts at QEMU's next pass once asked for: reported from the request on.
        if (postcopy && p.phase === "pre-copy") p.phase = "post-copy";
        if (q.status === "completed") {
          req.onProgress(p);
          await this.#dropMirrors(mirrors);
          return { totalTimeMs: q["total-time"] ?? 0, downtimeMs: q.downtime ?? 0 };
        }
        if (q.status === "failed" || q.status === "cancelled") {
          throw new VmenvError("unavailable", `the migration failed: ${q["error-desc"] ?? q.status}`, {
            reason: "MIGRATION_FAILED",
          });
        }
        if (q.status === "postcopy-paused") {
          throw new VmenvError(
            "unavailable",
            "post-copy was interrupted: the guest ran on the destination, part of its memory is still here; it can run on neither side",
            { reason: "POSTCOPY_INTERRUPTED" },
          );
        }
        req.onProgress(p);
        if (q.status === "pre-switchover" && !mirrored) {
          // The guest is paused: the mirrors are in sync; complete them without pivoting, then let the
          // migration switch over.
          storage.transferred = storage.total;
          await this.#completeMirrors(mirrors);
          mirrored = true;
          await this.qmp.execute("migrate-continue", { state: "pre-switchover" });
        }
        if (settings.postCopy && !postcopy && q.status === "active") {
          // Not converging: the remaining memory stopped shrinking over several passes.
          const remaining = q.ram?.remaining ?? 0;
          if (remaining < bestRemaining) {
            bestRemaining = remaining;
            stalled = 0;
          } else if ((q.ram?.["dirty-sync-count"] ?? 0) >= 3) stalled++;
          if (stalled >= 5) {
            // The point of no return: reported first (the operation stops being cancellable), then a
            // cancel that came before is still honoured.
            req.onProgress({ ...p, phase: "post-copy" });
            check();
            await this.qmp.execute("migrate-start-postcopy");
            postcopy = true;
          }
        }
        await this.nextChange(POLL_MS);
      }
    } catch (err) {
      await this.#rollBack(started, mirrors, req.wasRunning).catch((e: unknown) => {
        throw err instanceof VmenvError && err.reason === "POSTCOPY_INTERRUPTED" ? err : e;
      });
      throw err;
    }
  }

  async wentPostcopy(): Promise<boolean> {
    const q = await this.qmp.execute<QueryMigrate>("query-migrate");
    return (
      POSTCOPY.includes(q.status ?? "") ||
      (q.ram?.["postcopy-bytes"] ?? 0) > 0 ||
      (q.ram?.["postcopy-requests"] ?? 0) > 0
    );
  }

  /** Whether the guest already runs on the destination (post-copy): the source must not take it back. */
  async #inPostcopy(): Promise<boolean> {
    const q = await this.qmp.execute<QueryMigrate>("query-migrate").catch(() => undefined);
    return POSTCOPY.includes(q?.status ?? "");
  }

  async settle(wasRunning: boolean): Promise<"completed" | "rolled-back"> {
    let q = await this.qmp.execute<QueryMigrate>("query-migrate");
    // Post-copy cannot be undone (the guest runs on the destination): wait a while for its end.
    for (let i = 0; i < 300 && q.status === "postcopy-active"; i++) {
      await delay(100);
      q = await this.qmp.execute<QueryMigrate>("query-migrate");
    }
    if (q.status === "completed") {
      await this.#dropMirrors(await this.#leftMirrors());
      return "completed";
    }
    await this.#rollBack(true, await this.#leftMirrors(), wasRunning);
    return "rolled-back";
  }

  /** Disks whose mirror nodes a cut-short migration left (`mig-<disk>`). */
  async #leftMirrors(): Promise<string[]> {
    const nodes = await this.qmp
      .execute<{ "node-name": string }[]>("query-named-block-nodes", { flat: true })
      .catch(() => []);
    return nodes.map((n) => n["node-name"]).flatMap((n) => (n.startsWith("mig-") ? [n.slice(4)] : []));
  }

  async #jobs(mirrors: string[]): Promise<BlockJob[]> {
    const names = new Set(mirrors.map(mirrorOf));
    const jobs = (await this.qmp.execute<BlockJob[]>("query-block-jobs")).filter((j) => names.has(j.device));
    const failed = jobs.find((j) => j.status === "concluded" || j.status === "aborting");
    if (failed || (jobs.length < mirrors.length && mirrors.length > 0)) {
      throw new VmenvError("unavailable", "copying a disk to the destination failed (its mirror ended)", {
        reason: "STORAGE_COPY_FAILED",
      });
    }
    return jobs;
  }

  /** `block-job-cancel` of READY mirrors: they complete (everything copied) and leave the source disk as is. */
  async #completeMirrors(mirrors: string[]): Promise<void> {
    for (const id of mirrors) await this.qmp.execute("block-job-cancel", { device: mirrorOf(id) });
    await this.#waitJobsGone(mirrors);
  }

  async #waitJobsGone(mirrors: string[]): Promise<void> {
    const names = new Set(mirrors.map(mirrorOf));
    for (let i = 0; i < 300; i++) {
      const jobs = await this.qmp.execute<BlockJob[]>("query-block-jobs");
      if (!jobs.some((j) => names.has(j.device))) return;
      await delay(50);
    }
    throw new Error("the disk mirrors did not end within 15 s");
  }

  /** Removes the mirror jobs (forcing those not in sync) and their NBD nodes. */
  async #dropMirrors(mirrors: string[]): Promise<void> {
    const names = new Set(mirrors.map(mirrorOf));
    const jobs = (await this.qmp.execute<BlockJob[]>("query-block-jobs")).filter((j) => names.has(j.device));
    for (const j of jobs)
      await this.qmp.execute("block-job-cancel", { device: j.device, force: true }).catch(() => undefined);
    if (jobs.length > 0) await this.#waitJobsGone(mirrors).catch(() => undefined);
    for (const id of mirrors)
      await this.qmp.execute("blockdev-del", { "node-name": mirrorOf(id) }).catch(() => undefined);
  }

  /**
   * Undoes a migration that did not complete: cancel it, drop the mirrors, let the guest run on. Not
   * after post-copy started: the guest ran on the destination, and the source stays paused.
   */
  async #rollBack(started: boolean, mirrors: string[], wasRunning: boolean): Promise<void> {
    if (started && (await this.#inPostcopy())) {
      throw new VmenvError(
        "unavailable",
        "the migration is in post-copy: the guest runs on the destination and cannot come back here",
        { reason: "POSTCOPY_INTERRUPTED" },
      );
    }
    if (started) {
      await this.qmp.execute("migrate_cancel").catch(() => undefined);
      for (let i = 0; i < 200; i++) {
        const q = await this.qmp.execute<QueryMigrate>("query-migrate").catch(() => undefined);
        if (
          !q ||
          !["setup", "active", "cancelling", "pre-switchover", "device", "wait-unplug"].includes(
            q.status ?? "",
          )
        )
          break;
        if (q.status === "pre-switchover")
          await this.qmp.execute("migrate-continue", { state: "pre-switchover" }).catch(() => undefined);
        await delay(50);
      }
    }
    await this.#dropMirrors(mirrors).catch(() => undefined);
    // A migration that ended (completed, or cancelled at switchover) leaves the guest paused: resume it.
    const s = await this.qmp
      .execute<{ status: string; running: boolean }>("query-status")
      .catch(() => undefined);
    if (wasRunning && s && !s.running) await this.qmp.execute("cont").catch(() => undefined);
  }
}

/** A TCP port free on `host` right now (the kernel's pick). */
function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen({ host, port: 0, exclusive: true }, () => {
      const a = srv.address();
      const port = typeof a === "object" && a ? a.port : 0;
      srv.close(() => resolve(port));
    });
  });
}
