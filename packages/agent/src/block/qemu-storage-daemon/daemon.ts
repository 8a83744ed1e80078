/**
 * The qemu-storage-daemon adapter: one daemonized `qemu-storage-daemon` per exported volume, in its own
 * folder `<state>/block/daemons/<volume>/` (`daemon.json`, `qsd.pid`, `qmp.sock`, `export.sock`). Like a
 * VMM, the daemon is nobody's child: it outlives the agent, and the next agent adopts it from its folder
 * (pid alive, command line naming this folder's pid file, QMP answering).
 */
import { EventEmitter } from "node:events";
import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import { VmenvError } from "@vmenv/rpc/errors";
import { execa } from "execa";
import { alive, killHard, waitGone } from "../../vmm/process.js";
import { QmpClient } from "../../vmm/qemu/qmp.js";
import type { VolumeExport } from "../ports.js";

/** What a daemon serves: one volume file, as one export. */
export interface DaemonSpec {
  volumeId: string;
  kind: "vhost-user-blk" | "nbd";
  path: string;
  format: "raw" | "qcow2";
  writable: boolean;
}

export interface DaemonPaths {
  dir: string;
  record: string;
  pidFile: string;
  qmp: string;
  socket: string;
}

/** Node name of the volume's format node inside the daemon (what `block_resize` names). */
export const DAEMON_NODE = "disk";

/** The qemu-storage-daemon command line of one export. Pure. */
export function daemonArgs(spec: DaemonSpec, p: DaemonPaths): string[] {
  // Option values end at a comma; a comma inside a value is written twice.
  const v = (s: string) => s.replaceAll(",", ",,");
  const ro = spec.writable ? "off" : "on";
  const args = [
    "--blockdev",
    `driver=file,filename=${v(spec.path)},node-name=file,read-only=${ro}`,
    "--blockdev",
    `driver=${spec.format},file=file,node-name=${DAEMON_NODE},read-only=${ro}`,
  ];
  const writable = spec.writable ? "on" : "off";
  if (spec.kind === "vhost-user-blk") {
    args.push(
      "--export",
      `type=vhost-user-blk,id=exp,node-name=${DAEMON_NODE},addr.type=unix,addr.path=${v(p.socket)},writable=${writable},num-queues=1`,
    );
  } else {
    args.push(
      "--nbd-server",
      `addr.type=unix,addr.path=${v(p.socket)}`,
      "--export",
      `type=nbd,id=exp,node-name=${DAEMON_NODE},name=${spec.volumeId},writable=${writable}`,
    );
  }
  args.push(
    "--chardev",
    `socket,id=qmp,path=${v(p.qmp)},server=on,wait=off`,
    "--monitor",
    "chardev=qmp",
    "--pidfile",
    p.pidFile,
    "--daemonize",
  );
  return args;
}

/** A running storage daemon the agent holds a QMP connection to. Emits "exit" when it ends. */
export class StorageDaemon extends EventEmitter<{ exit: [] }> {
  #detached = false;
  constructor(
    readonly spec: DaemonSpec,
    readonly pid: number,
    readonly paths: DaemonPaths,
    private readonly qmp: QmpClient,
  ) {
    super();
    qmp.once("close", () => {
      void (async () => {
        for (let i = 0; i < 100 && alive(pid); i++) await delay(20);
        if (!this.#detached) this.emit("exit");
      })();
    });
  }

  get running(): boolean {
    return !this.qmp.closed && alive(this.pid);
  }

  /** How a VMM reaches the export. */
  get address(): VolumeExport {
    return this.spec.kind === "vhost-user-blk"
      ? { kind: "vhost-user-blk", socket: this.paths.socket }
      : { kind: "nbd", socket: this.paths.socket, exportName: this.spec.volumeId };
  }

  /** Grows the exported node (a vhost-user-blk client is told of the new size by the daemon). */
  async resize(sizeBytes: bigint): Promise<void> {
    await this.qmp.execute("block_resize", { "node-name": DAEMON_NODE, size: Number(sizeBytes) });
  }

  /** Ends the daemon (QMP `quit`, then SIGKILL) and waits until it is gone. */
  async stop(): Promise<void> {
    this.#detached = true;
    await this.qmp.execute("quit", undefined, { timeoutMs: 3000 }).catch(() => undefined);
    if (!(await waitGone(this.pid, 3000))) {
      killHard(this.pid);
      await waitGone(this.pid, 3000);
    }
    this.qmp.close();
  }

  /** Lets go of the daemon; it keeps running for the next agent. */
  detach(): void {
    this.#detached = true;
    this.qmp.close();
  }
}

async function readPid(path: string): Promise<number | undefined> {
  const n = Number((await readFile(path, "utf8").catch(() => "")).trim());
  return Number.isInteger(n) && n > 0 ? n : undefined;
}

/** Starts, adopts and stops the storage daemons of one agent. */
export class StorageDaemons {
  readonly dir: string;
  constructor(
    stateDir: string,
    private readonly binary = "qemu-storage-daemon",
  ) {
    this.dir = join(stateDir, "block", "daemons");
  }

  paths(volumeId: string): DaemonPaths {
    const dir = join(this.dir, volumeId);
    return {
      dir,
      record: join(dir, "daemon.json"),
      pidFile: join(dir, "qsd.pid"),
      qmp: join(dir, "qmp.sock"),
      socket: join(dir, "export.sock"),
    };
  }

  /** Volume ids that have a daemon folder. */
  async folders(): Promise<string[]> {
    return (await readdir(this.dir).catch(() => [] as string[])).filter((n) => /^[a-z][a-z0-9-]*$/.test(n));
  }

  /** Starts a daemon for `spec` (after ending whatever a previous one left in its folder). */
  async start(spec: DaemonSpec, signal?: AbortSignal): Promise<StorageDaemon> {
    const p = this.paths(spec.volumeId);
    await this.#kill(spec.volumeId);
    await mkdir(p.dir, { recursive: true, mode: 0o750 });
    // The record first: a daemon is never running without a folder that names it.
    const tmp = `${p.record}.tmp`;
    await writeFile(tmp, JSON.stringify({ format: 1, daemon: spec }, null, 2), { mode: 0o640 });
    await rename(tmp, p.record);
    const r = await execa(this.binary, daemonArgs(spec, p), {
      reject: false,
      timeout: 30_000,
      stdin: "ignore",
      ...(signal ? { cancelSignal: signal } : {}),
    });
    if (r.exitCode !== 0) {
      await rm(p.dir, { recursive: true, force: true });
      const msg =
        (r.stderr || r.stdout || `exit ${r.exitCode ?? r.signal}`).split("\n").find((l) => l.trim()) ?? "";
      throw new VmenvError(
        "failed-precondition",
        `qemu-storage-daemon did not start for volumes/${spec.volumeId}: ${msg.replace(/^qemu-storage-daemon: /, "")}`,
        { reason: "STORAGE_DAEMON_START_FAILED", metadata: { volume: `volumes/${spec.volumeId}` } },
      );
    }
    const pid = await readPid(p.pidFile);
    const d = pid ? await this.#connect(spec, pid, p) : undefined;
    if (!d) {
      await this.#kill(spec.volumeId);
      throw new Error(`qemu-storage-daemon for volumes/${spec.volumeId} exited right after it started`);
    }
    return d;
  }

  /**
   * The daemon a previous agent left running for this volume (pid alive, started from this folder, QMP
   * answering), with its spec; a dead or unreachable one is ended and only its spec is returned (so that
   * it can be started again); a folder without a readable record is removed.
   */
  async adopt(
    volumeId: string,
  ): Promise<{ daemon: StorageDaemon | undefined; spec: DaemonSpec | undefined }> {
    const p = this.paths(volumeId);
    const doc = await readFile(p.record, "utf8").then(
      (t) => JSON.parse(t) as { format?: number; daemon?: DaemonSpec },
      () => undefined,
    );
    const spec = doc?.format === 1 ? doc.daemon : undefined;
    const pid = await readPid(p.pidFile);
    if (spec && pid && (await this.#ours(pid, p))) {
      const d = await this.#connect(spec, pid, p).catch(() => undefined);
      if (d) return { daemon: d, spec };
    }
    await this.#kill(volumeId);
    return { daemon: undefined, spec };
  }

  /** Ends whatever daemon runs from this volume's folder and removes the folder. */
  async #kill(volumeId: string): Promise<void> {
    const p = this.paths(volumeId);
    const pid = await readPid(p.pidFile);
    if (pid && (await this.#ours(pid, p))) {
      killHard(pid);
      await waitGone(pid, 5000);
    }
    await rm(p.dir, { recursive: true, force: true });
  }

  /** Removes a folder whose daemon is gone (or kills it). */
  remove(volumeId: string): Promise<void> {
    return this.#kill(volumeId);
  }

  /** Whether `pid` is a storage daemon started from this folder (not a reused pid). */
  async #ours(pid: number, p: DaemonPaths): Promise<boolean> {
    if (!alive(pid)) return false;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    return cmdline.split("\0").includes(p.pidFile);
  }

  async #connect(spec: DaemonSpec, pid: number, p: DaemonPaths): Promise<StorageDaemon | undefined> {
    let lastErr: unknown;
    for (let i = 0; i < 100; i++) {
      if (!alive(pid)) return undefined;
      try {
        return new StorageDaemon(spec, pid, p, await QmpClient.connect(p.qmp, { timeoutMs: 5000 }));
      } catch (e) {
        lastErr = e;
        await delay(50);
      }
    }
    throw new Error(`cannot reach qemu-storage-daemon ${pid} over QMP: ${(lastErr as Error)?.message}`);
  }
}
