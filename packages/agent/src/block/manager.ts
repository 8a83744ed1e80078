import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { chmod, mkdir, realpath, rename, rm, stat, statfs } from "node:fs/promises";
import { join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { ERROR_DOMAIN } from "@vmenv/rpc";
import {
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
  unimplemented,
  VmenvError,
} from "@vmenv/rpc/errors";
import type { Logger } from "pino";
import type { OperationHandle, OperationRecord, Operations } from "../diagnostics/operations.js";
import {
  checkAbsolutePath,
  checkFits,
  checkId,
  checkSize,
  clonesOf,
  DEFAULT_STORE,
  inUse,
  notReady,
  SECTOR,
  type StoreRecord,
  sameStore,
  sameVolumeSpec,
  specOf,
  type VolumeBackendKind,
  type VolumeFormat,
  type VolumeRecord,
  type VolumeSnapshotRecord,
  type VolumeSpec,
  vmName,
} from "./domain.js";
import type { LiveVolumeResize, VolumeFile, VolumeResolver, VolumeUsers } from "./ports.js";
import { QemuImg } from "./qemu-img.js";
import { type DaemonSpec, type StorageDaemon, StorageDaemons } from "./qemu-storage-daemon/daemon.js";
import { BlockRecords, volumePaths } from "./records.js";

export interface BlockManagerDeps {
  /** The agent's state directory: store records under `block/`, the default store at `volumes/`. */
  stateDir: string;
  operations: Operations;
  /** Which VMs use a volume (from the VM side); called at every check, so it may be bound late. */
  volumeUsers: VolumeUsers;
  logger: Logger;
  /** The qemu-img adapter; default: `qemu-img` from PATH. */
  qemuImg?: QemuImg;
  /**
   * Which VMs have the volume open in a live VMM now (bound, VMM starting or running): what keeps a
   * storage daemon running. May be bound late.
   */
  activeUsers?: VolumeUsers;
  /** Grows a file-backed volume inside the VMMs that have it open (the VM side). May be bound late. */
  liveResize?: LiveVolumeResize;
  /** The storage-daemon adapter; default: `qemu-storage-daemon` from PATH, folders under `block/daemons`. */
  storageDaemons?: StorageDaemons;
  now?: () => number;
}

/** How long a storage daemon started for an attachment waits for the VM to show it bound. */
const DAEMON_HOLD_MS = 60_000;

/** The storage daemon of one volume: what it serves, the running process (undefined while down). */
interface DaemonEntry {
  spec: DaemonSpec;
  daemon: StorageDaemon | undefined;
  /** Not stopped for want of users before this time (an attachment in progress). */
  holdUntil: number;
}

/** A store with its capacity figures, measured when asked. */
export interface StoreView {
  kind: "store";
  record: StoreRecord;
  capacityBytes: bigint;
  freeBytes: bigint;
  usedBytes: bigint;
  provisionedBytes: bigint;
  volumeCount: number;
}

/** A volume with what is measured when asked. */
export interface VolumeView {
  kind: "volume";
  record: VolumeRecord;
  allocatedBytes: bigint;
  usedBy: string[];
  /** Where VMMs reach a daemon-served volume (socket path or NBD URI); "" while no daemon serves it. */
  backendAddress: string;
}

/** A volume snapshot with its linked clones. */
export interface VolumeSnapshotView {
  kind: "volume-snapshot";
  volume: string;
  snapshot: VolumeSnapshotRecord;
  clones: string[];
}

/** Snapshot records also say which file holds them (the volume's file, or a base it was frozen into). */
type SnapshotRecord = VolumeSnapshotRecord & { file?: string; base?: string };

const exists = (p: string) =>
  stat(p).then(
    () => true,
    () => false,
  );
const allocated = (p: string) =>
  stat(p).then(
    (s) => BigInt(s.blocks) * SECTOR,
    () => 0n,
  );

/**
 * The block storage of this agent: stores (directories) and volumes (image files with a JSON record
 * beside them). Every mutation of a volume first moves it out of `ready` (synchronously, so two calls
 * cannot both pass the check), then does its slow work as an operation, then writes the outcome.
 */
export class BlockManager implements VolumeResolver {
  readonly #stores = new Map<string, StoreRecord>();
  readonly #volumes = new Map<string, VolumeRecord>();
  /** Running create/import/clone operations by volume id, so that a repeated call joins them. */
  readonly #creating = new Map<string, string>();
  readonly #records: BlockRecords;
  readonly #img: QemuImg;
  readonly #now: () => number;
  readonly #qsd: StorageDaemons;
  /** Storage daemons by volume id. */
  readonly #daemons = new Map<string, DaemonEntry>();
  /** Serialises daemon starts and stops per volume. */
  readonly #daemonLocks = new Map<string, Promise<unknown>>();
  #reconciling = false;
  #reconcileAgain = false;

  constructor(private readonly d: BlockManagerDeps) {
    this.#records = new BlockRecords(d.stateDir);
    this.#img = d.qemuImg ?? new QemuImg();
    this.#now = d.now ?? Date.now;
    this.#qsd = d.storageDaemons ?? new StorageDaemons(d.stateDir);
  }

  /** Where the default store lives. */
  get defaultStorePath(): string {
    return join(this.d.stateDir, "volumes");
  }

  // ---- start -----------------------------------------------------------------------------------

  /**
   * Loads stores and volumes, makes the default store when missing, and finishes or undoes what a
   * previous agent left half done: a volume still `creating` is removed with its file, one `deleting`
   * is removed, an interrupted linked-clone freeze is rolled back or completed.
   */
  async init(): Promise<void> {
    for (const s of await this.#records.loadStores()) this.#stores.set(s.id, s);
    if (!this.#stores.has(DEFAULT_STORE)) {
      const s: StoreRecord = {
        id: DEFAULT_STORE,
        path: this.defaultStorePath,
        shared: false,
        labels: {},
        createTimeMs: this.#now(),
      };
      await mkdir(s.path, { recursive: true, mode: 0o750 });
      await this.#records.saveStore(s);
      this.#stores.set(s.id, s);
    }
    await mkdir(this.defaultStorePath, { recursive: true, mode: 0o750 });
    for (const s of this.#stores.values()) {
      if (!(await exists(s.path))) {
        this.d.logger.warn({ store: `stores/${s.id}`, path: s.path }, "store directory is missing");
        continue;
      }
      for (const r of await this.#records.loadVolumes(s.path)) await this.#recover(s, r);
    }
    await this.#adoptDaemons();
  }

  // ---- storage daemons -------------------------------------------------------------------------

  /**
   * Finds the storage daemons a previous agent left: a live one is re-adopted (kept at least until the
   * first reconcile, which runs once the VMs are known), a dead one is remembered by its spec (restarted
   * by the reconcile when a VM still uses it), one whose volume is gone is ended.
   */
  async #adoptDaemons(): Promise<void> {
    for (const id of await this.#qsd.folders()) {
      const r = this.#volumes.get(id);
      if (!r || r.backend === "file") {
        await this.#qsd.remove(id);
        this.d.logger.info({ volume: `volumes/${id}` }, "ended a storage daemon whose volume is gone");
        continue;
      }
      const { daemon, spec } = await this.#qsd.adopt(id);
      if (!spec) continue;
      this.#daemons.set(id, { spec, daemon, holdUntil: 0 });
      if (daemon) {
        this.#watch(id, daemon);
        this.d.logger.info({ volume: `volumes/${id}`, pid: daemon.pid }, "re-adopted storage daemon");
      }
    }
  }

  #daemonLocked<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const run = (this.#daemonLocks.get(id) ?? Promise.resolve()).then(fn, fn);
    const settled = run.catch(() => undefined);
    this.#daemonLocks.set(id, settled);
    void settled.then(() => {
      if (this.#daemonLocks.get(id) === settled) this.#daemonLocks.delete(id);
    });
    return run;
  }

  #active(id: string): string[] {
    return (this.d.activeUsers?.(`volumes/${id}`) ?? []).map(vmName);
  }

  #watch(id: string, daemon: StorageDaemon): void {
    daemon.once("exit", () => {
      if (this.#daemons.get(id)?.daemon !== daemon) return;
      this.d.logger.warn({ volume: `volumes/${id}`, pid: daemon.pid }, "storage daemon exited");
      this.scheduleReconcile();
    });
  }

  async #startDaemon(e: DaemonEntry): Promise<StorageDaemon> {
    const daemon = await this.#qsd.start(e.spec);
    e.daemon = daemon;
    this.#watch(e.spec.volumeId, daemon);
    return daemon;
  }

  /** Ends the volume's storage daemon, if it has one. */
  async #stopDaemon(id: string): Promise<void> {
    await this.#daemonLocked(id, async () => {
      const e = this.#daemons.get(id);
      if (!e) return;
      this.#daemons.delete(id);
      await e.daemon?.stop();
      await this.#qsd.remove(id);
    });
  }

  /**
   * VolumeResolver: the volume as a VM attaches it. A FILE volume is its file; a VHOST_USER_BLK or NBD
   * volume gets its storage daemon (started when none runs) and the VMM connects to its socket. A
   * vhost-user-blk export serves one VMM at a time; a read-only export is not opened writable.
   */
  async open(volumeName: string, user: { vm: string; readOnly: boolean }): Promise<VolumeFile> {
    const f = await this.resolve(volumeName);
    const r = this.#volume(volumeName.slice("volumes/".length));
    if (r.backend === "file") return f;
    return this.#daemonLocked(r.id, async () => {
      const others = this.#active(r.id).filter((u) => u !== vmName(user.vm));
      if (r.backend === "vhost-user-blk" && others.length > 0) {
        throw failedPrecondition(
          `volumes/${r.id} is served over vhost-user-blk to ${others[0]}; such an export serves one VM at a time`,
          "VOLUME_EXPORT_BUSY",
          { volume: `volumes/${r.id}`, vm: others[0] ?? "" },
        );
      }
      let e = this.#daemons.get(r.id);
      if (e?.daemon && !e.daemon.running) e.daemon = undefined;
      const writable = !user.readOnly;
      if (e?.daemon && e.spec.writable !== writable) {
        if (others.length > 0 && writable) {
          throw failedPrecondition(
            `volumes/${r.id} is exported read-only for ${others[0]}; it cannot be attached writable too`,
            "VOLUME_EXPORT_READ_ONLY",
            { volume: `volumes/${r.id}`, vm: others[0] ?? "" },
          );
        }
        if (others.length === 0) {
          // Nobody else reads it: serve it again with the writability this VM asks for.
          await e.daemon.stop();
          e.daemon = undefined;
        }
      }
      if (!e?.daemon) {
        const spec: DaemonSpec = {
          volumeId: r.id,
          kind: r.backend === "nbd" ? "nbd" : "vhost-user-blk",
          path: r.path,
          format: r.format,
          writable: e && others.length > 0 ? e.spec.writable : writable,
        };
        e = { spec, daemon: undefined, holdUntil: 0 };
        this.#daemons.set(r.id, e);
        const daemon = await this.#startDaemon(e).catch(async (err: unknown) => {
          this.#daemons.delete(r.id);
          throw err;
        });
        this.d.logger.info(
          { volume: `volumes/${r.id}`, pid: daemon.pid, backend: spec.kind, writable: spec.writable },
          "started storage daemon",
        );
      }
      e.holdUntil = this.#now() + DAEMON_HOLD_MS;
      const daemon = e.daemon as StorageDaemon;
      return { ...f, export: daemon.address };
    });
  }

  /** Runs a reconcile of the storage daemons soon (coalesced). */
  scheduleReconcile(): void {
    if (this.#reconciling) {
      this.#reconcileAgain = true;
      return;
    }
    this.#reconciling = true;
    void (async () => {
      do {
        this.#reconcileAgain = false;
        await this.reconcileDaemons().catch((err: unknown) =>
          this.d.logger.error({ err }, "storage daemon reconcile failed"),
        );
      } while (this.#reconcileAgain);
      this.#reconciling = false;
    })();
  }

  /**
   * Makes the storage daemons match their use: a volume a live VMM uses has a running daemon (restarted
   * when it died: the VMM reconnects; the volume is marked failed when it cannot be restarted), a daemon
   * nothing uses any more (and no attachment is waiting for) is stopped.
   */
  async reconcileDaemons(): Promise<void> {
    const ids = new Set(this.#daemons.keys());
    for (const r of this.#volumes.values())
      if (r.backend !== "file" && this.#active(r.id).length > 0) ids.add(r.id);
    for (const id of ids) {
      await this.#daemonLocked(id, async () => {
        const r = this.#volumes.get(id);
        const active = r ? this.#active(id) : [];
        let e = this.#daemons.get(id);
        if (active.length === 0) {
          if (!e || (r && this.#now() < e.holdUntil && e.daemon?.running)) return;
          this.#daemons.delete(id);
          await e.daemon?.stop();
          await this.#qsd.remove(id);
          this.d.logger.info({ volume: `volumes/${id}` }, "stopped storage daemon: no VM uses the volume");
          return;
        }
        if (!r) return;
        if (!e) {
          e = {
            spec: {
              volumeId: id,
              kind: r.backend === "nbd" ? "nbd" : "vhost-user-blk",
              path: r.path,
              format: r.format,
              writable: true,
            },
            daemon: undefined,
            holdUntil: 0,
          };
          this.#daemons.set(id, e);
        }
        e.holdUntil = 0;
        if (e.daemon?.running) return;
        try {
          const daemon = await this.#startDaemon(e);
          this.d.logger.warn(
            { volume: `volumes/${id}`, pid: daemon.pid, vms: active },
            "restarted the storage daemon of a volume in use",
          );
          if (r.state === "failed" && r.stateMessage.startsWith("storage daemon")) {
            r.state = "ready";
            r.stateMessage = "";
            await this.#save(r);
          }
        } catch (err) {
          this.d.logger.error({ err, volume: `volumes/${id}` }, "cannot restart storage daemon");
          r.state = "failed";
          r.stateMessage = `storage daemon: ${(err as Error).message}`;
          await this.#save(r);
        }
      });
    }
  }

  /** Lets go of the storage daemons (they keep serving): the agent is stopping. */
  detachDaemons(): void {
    for (const e of this.#daemons.values()) e.daemon?.detach();
  }

  async #recover(s: StoreRecord, r: VolumeRecord): Promise<void> {
    const log = { volume: `volumes/${r.id}`, store: `stores/${s.id}` };
    if (this.#volumes.has(r.id)) {
      this.d.logger.error(
        { ...log, path: r.path },
        "a volume with this id is already in another store; ignored",
      );
      return;
    }
    if (r.state === "creating" || r.state === "deleting") {
      await rm(r.path, { force: true });
      if (r.state === "deleting") for (const b of r.bases) await rm(b, { force: true });
      await this.#records.removeVolume(s.path, r);
      this.d.logger.info(log, r.state === "creating" ? "removed a half-created volume" : "finished a delete");
      return;
    }
    if (r.pending?.kind === "freeze") {
      const base = r.pending.base;
      const overlay = await this.#img.info(r.path).catch(() => undefined);
      if (overlay?.backingFile === base) {
        if (!r.bases.includes(base)) r.bases.push(base);
      } else if (await exists(base)) {
        await rm(r.path, { force: true });
        await rename(base, r.path);
      }
      r.pending = undefined;
    }
    if (r.state === "updating") {
      const info = await this.#img.info(r.path, { format: r.format }).catch(() => undefined);
      if (info) r.sizeBytes = info.virtualSize;
      r.state = "ready";
      r.stateMessage = "an action was cut short by an agent restart";
    }
    if (!(await exists(r.path))) {
      r.state = "failed";
      r.stateMessage = `its file ${r.path} is missing`;
    }
    this.#volumes.set(r.id, r);
    await this.#records.saveVolume(s.path, r);
  }

  // ---- stores ----------------------------------------------------------------------------------

  async createStore(
    id: string,
    want: { path: string; shared: boolean; labels: Record<string, string> },
  ): Promise<StoreView> {
    checkId("store", id, "store_id");
    if (!want.path) throw invalidArgument("store.path", "is required");
    const path = checkAbsolutePath(want.path, "store.path");
    const existing = this.#stores.get(id);
    if (existing) {
      if (!sameStore(existing, { ...want, path })) throw alreadyExists("store", `stores/${id}`);
      return this.#storeView(existing);
    }
    for (const other of this.#stores.values()) {
      if (other.path === path || (await realpath(other.path).catch(() => other.path)) === path) {
        throw new VmenvError("already-exists", `${path} is already the directory of stores/${other.id}`, {
          reason: "STORE_PATH_IN_USE",
          metadata: { store: `stores/${other.id}`, path },
        });
      }
    }
    const made = await mkdir(path, { recursive: true, mode: 0o750 }).catch((e: NodeJS.ErrnoException) => e);
    if (made instanceof Error || !(await stat(path)).isDirectory()) {
      throw invalidArgument("store.path", `${path} is not a directory that can be created or used`);
    }
    const real = await realpath(path);
    for (const other of this.#stores.values()) {
      if ((await realpath(other.path).catch(() => other.path)) === real) {
        if (typeof made === "string") await rm(made, { recursive: true, force: true });
        throw new VmenvError("already-exists", `${path} is already the directory of stores/${other.id}`, {
          reason: "STORE_PATH_IN_USE",
          metadata: { store: `stores/${other.id}`, path },
        });
      }
    }
    const s: StoreRecord = { id, path, shared: want.shared, labels: want.labels, createTimeMs: this.#now() };
    await this.#records.saveStore(s);
    this.#stores.set(id, s);
    return this.#storeView(s);
  }

  getStore(id: string): Promise<StoreView> {
    return this.#storeView(this.#store(id));
  }

  async listStores(): Promise<StoreView[]> {
    const all = [...this.#stores.values()].sort((a, b) => a.id.localeCompare(b.id));
    return Promise.all(all.map((s) => this.#storeView(s)));
  }

  /** Forgets a store that holds no volume; its directory and other files stay. */
  async deleteStore(id: string, opts: { allowMissing?: boolean } = {}): Promise<void> {
    const s = this.#stores.get(id);
    if (!s) {
      if (opts.allowMissing) return;
      throw notFound("store", `stores/${id}`);
    }
    if (id === DEFAULT_STORE) {
      throw failedPrecondition(
        "stores/default is the agent's own store and cannot be deleted",
        "DEFAULT_STORE",
        {
          store: "stores/default",
        },
      );
    }
    const v = [...this.#volumes.values()].find((r) => r.store === id);
    if (v) {
      throw failedPrecondition(`stores/${id} still holds volumes/${v.id}`, "STORE_NOT_EMPTY", {
        store: `stores/${id}`,
        volume: `volumes/${v.id}`,
      });
    }
    this.#stores.delete(id);
    await this.#records.removeStore(id);
  }

  #store(id: string, field?: string): StoreRecord {
    const s = this.#stores.get(id);
    if (!s) {
      const e = notFound("store", `stores/${id}`);
      if (!field) throw e;
      throw new VmenvError("not-found", e.message, {
        reason: e.reason,
        metadata: { ...e.metadata, field },
      });
    }
    return s;
  }

  async #space(s: StoreRecord): Promise<{ capacityBytes: bigint; freeBytes: bigint }> {
    const f = await statfs(s.path, { bigint: true });
    return { capacityBytes: f.blocks * f.bsize, freeBytes: f.bavail * f.bsize };
  }

  async #storeView(s: StoreRecord): Promise<StoreView> {
    const volumes = [...this.#volumes.values()].filter((r) => r.store === s.id);
    const { capacityBytes, freeBytes } = await this.#space(s).catch(() => ({
      capacityBytes: 0n,
      freeBytes: 0n,
    }));
    let usedBytes = 0n;
    for (const r of volumes) {
      usedBytes += await allocated(r.path);
      for (const b of r.bases) usedBytes += await allocated(b);
    }
    return {
      kind: "store",
      record: s,
      capacityBytes,
      freeBytes,
      usedBytes,
      provisionedBytes: volumes.reduce((n, r) => n + r.sizeBytes, 0n),
      volumeCount: volumes.length,
    };
  }

  async #checkFits(s: StoreRecord, sizeBytes: bigint): Promise<void> {
    const { capacityBytes, freeBytes } = await this.#space(s);
    checkFits(s.id, sizeBytes, freeBytes, capacityBytes);
  }

  // ---- volumes: queries ------------------------------------------------------------------------

  #users(id: string): string[] {
    return this.d.volumeUsers(`volumes/${id}`).map(vmName);
  }

  #volume(id: string): VolumeRecord {
    const r = this.#volumes.get(id);
    if (!r) throw notFound("volume", `volumes/${id}`);
    return r;
  }

  async #view(r: VolumeRecord): Promise<VolumeView> {
    const daemon = this.#daemons.get(r.id)?.daemon;
    const a = daemon?.running ? daemon.address : undefined;
    return {
      kind: "volume",
      record: r,
      allocatedBytes: await allocated(r.path),
      usedBy: this.#users(r.id),
      backendAddress: !a
        ? ""
        : a.kind === "vhost-user-blk"
          ? a.socket
          : `nbd+unix:///${a.exportName}?socket=${a.socket}`,
    };
  }

  getVolume(id: string): Promise<VolumeView> {
    return this.#view(this.#volume(id));
  }

  /** Volumes in id order, filtered by store, user and labels. */
  async listVolumes(
    f: { store?: string; usedBy?: string; labels?: Record<string, string> } = {},
  ): Promise<VolumeView[]> {
    if (f.store) this.#store(f.store, "store");
    const all = [...this.#volumes.values()]
      .filter((r) => !f.store || r.store === f.store)
      .filter((r) => Object.entries(f.labels ?? {}).every(([k, v]) => r.labels[k] === v))
      .sort((a, b) => a.id.localeCompare(b.id));
    const views = await Promise.all(all.map((r) => this.#view(r)));
    return f.usedBy ? views.filter((v) => v.usedBy.includes(vmName(f.usedBy ?? ""))) : views;
  }

  /** VolumeResolver: the file behind `volumes/{id}`, for a VM disk. */
  async resolve(volumeName: string): Promise<VolumeFile> {
    const id = volumeName.startsWith("volumes/") ? volumeName.slice("volumes/".length) : "";
    const r = this.#volumes.get(id);
    if (!r || r.state === "creating" || r.state === "deleting") {
      throw new VmenvError("not-found", `volume ${volumeName} not found`, {
        reason: "VOLUME_NOT_FOUND",
        metadata: { volume: volumeName },
      });
    }
    if (r.state === "failed") throw notReady(r, "use");
    return { name: `volumes/${r.id}`, path: r.path, format: r.format, sizeBytes: r.sizeBytes };
  }

  // ---- volumes: create, import, clone ----------------------------------------------------------

  /** Creates a blank volume. Idempotent by id and spec; ALREADY_EXISTS with a different spec. */
  async create(id: string, spec: VolumeSpec, opts: { requestId?: string } = {}): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    checkId("volume", id, "volume_id");
    checkSize(spec.sizeBytes, "volume.size_bytes");
    const s = this.#store(spec.store, "volume.store");
    const again = this.#again(id, "volume.create", opts.requestId, (r) =>
      sameVolumeSpec(specOf(r, spec.preallocate), spec),
    );
    if (again) return again;
    await this.#checkFits(s, spec.sizeBytes);
    const raced = this.#again(id, "volume.create", opts.requestId, (r) =>
      sameVolumeSpec(specOf(r, spec.preallocate), spec),
    );
    if (raced) return raced;
    return this.#newVolume("volume.create", id, s, spec, { source: "" }, opts.requestId, async (r, op) => {
      await this.#img.create(r.path, r.format, r.sizeBytes, {
        preallocate: spec.preallocate,
        signal: op.signal,
      });
    });
  }

  /** Imports a host image file into a new volume (converted to the volume's format). */
  async import(
    id: string,
    want: {
      store: string;
      format: VolumeFormat | undefined;
      sizeBytes: bigint;
      backend: VolumeBackendKind;
      labels: Record<string, string>;
    },
    source: { uri: string; format: VolumeFormat | undefined; sha256: string },
    opts: { requestId?: string } = {},
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    checkId("volume", id, "volume_id");
    if (!source.uri) throw invalidArgument("source_uri", "is required");
    if (/^https?:\/\//.test(source.uri))
      throw unimplemented("ImportVolumeRequest.source_uri", "http(s) sources arrive later; give a host path");
    const src = checkAbsolutePath(source.uri, "source_uri");
    if (source.sha256 && !/^[0-9a-f]{64}$/.test(source.sha256))
      throw invalidArgument("source_sha256", "must be 64 lower-case hex digits");
    if (want.sizeBytes !== 0n) checkSize(want.sizeBytes, "volume.size_bytes");
    const s = this.#store(want.store, "volume.store");
    const format = want.format ?? "qcow2";
    const again = this.#again(
      id,
      "volume.import",
      opts.requestId,
      (r) =>
        r.source === src &&
        r.store === want.store &&
        r.format === format &&
        (want.sizeBytes === 0n || r.sizeBytes === want.sizeBytes),
    );
    if (again) return again;
    const st = await stat(src).catch(() => undefined);
    if (!st?.isFile()) {
      throw new VmenvError("not-found", `no image file at ${src}`, {
        reason: "IMPORT_SOURCE_NOT_FOUND",
        metadata: { source_uri: src, field: "source_uri" },
      });
    }
    const info = await this.#img
      .info(src, source.format ? { format: source.format } : {})
      .catch((e: unknown) => {
        throw invalidArgument(
          "source_uri",
          `${src} is not an image qemu-img can read${source.format ? ` as ${source.format}` : ""}: ${(e as Error).message}`,
          "IMPORT_SOURCE_UNREADABLE",
        );
      });
    if (info.backingFile) {
      throw invalidArgument(
        "source_uri",
        `${src} has a backing file (${info.backingFile}); import a self-contained image`,
        "IMPORT_SOURCE_HAS_BACKING_FILE",
      );
    }
    const imageSize = ((info.virtualSize + SECTOR - 1n) / SECTOR) * SECTOR;
    if (want.sizeBytes !== 0n && want.sizeBytes < imageSize) {
      throw invalidArgument(
        "volume.size_bytes",
        `${want.sizeBytes} is smaller than the image (${imageSize} bytes); volumes do not shrink`,
      );
    }
    const size = want.sizeBytes === 0n ? imageSize : want.sizeBytes;
    await this.#checkFits(s, size);
    const spec: VolumeSpec = { ...want, format, sizeBytes: size, preallocate: false };
    const raced = this.#again(id, "volume.import", opts.requestId, (r) => r.source === src);
    if (raced) return raced;
    return this.#newVolume("volume.import", id, s, spec, { source: src }, opts.requestId, async (r, op) => {
      if (source.sha256) {
        op.progress(5, "checking the image's SHA-256");
        const sum = await sha256(src, op.signal);
        if (sum !== source.sha256) {
          throw new ConnectError(
            `${src} has SHA-256 ${sum}, not ${source.sha256}`,
            Code.DataLoss,
            undefined,
            [
              {
                desc: ErrorInfoSchema,
                value: {
                  reason: "IMPORT_CHECKSUM_MISMATCH",
                  domain: ERROR_DOMAIN,
                  metadata: { source_uri: src, sha256: sum },
                },
              },
            ],
          );
        }
      }
      op.progress(20, "converting the image");
      await this.#img.convert(src, info.format, r.path, r.format, { signal: op.signal });
      if (size > info.virtualSize) await this.#img.resize(r.path, r.format, size, op.signal);
    });
  }

  /**
   * Clones a volume or a volume snapshot: a full copy (`qemu-img convert`, any format), or a linked
   * qcow2 clone. A linked clone of a volume first freezes the volume's content into a read-only base
   * and gives the volume a fresh overlay on it, so that source and clone are independent from then on
   * (ADR 0007).
   */
  async clone(
    source: { volume: string; snapshot: string | undefined },
    id: string,
    want: {
      store: string | undefined;
      sizeBytes: bigint;
      backend: VolumeBackendKind;
      labels: Record<string, string>;
      linked: boolean;
    },
    opts: { requestId?: string } = {},
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    checkId("volume", id, "volume_id");
    const srcName = `volumes/${source.volume}${source.snapshot ? `/snapshots/${source.snapshot}` : ""}`;
    const again = this.#again(id, "volume.clone", opts.requestId, (r) => r.source === srcName);
    if (again) return again;
    const src = this.#volume(source.volume);
    if (src.state !== "ready") throw notReady(src, "clone");
    const snap = source.snapshot ? this.#snapshot(src, source.snapshot) : undefined;
    const users = this.#users(src.id);
    if (users.length > 0) throw inUse(src.id, users, "clone");
    if (want.linked && want.store && want.store !== src.store) {
      throw invalidArgument(
        "volume.store",
        `a linked clone lives in its source's store (stores/${src.store}), not stores/${want.store}`,
      );
    }
    if (want.linked && !snap && src.format !== "qcow2") {
      throw failedPrecondition(
        `volumes/${src.id} is raw; linked clones need a qcow2 source (make a full copy instead)`,
        "VOLUME_FORMAT_UNSUPPORTED",
        { volume: `volumes/${src.id}`, format: src.format },
      );
    }
    const srcSize = snap ? snap.sizeBytes : src.sizeBytes;
    if (want.sizeBytes !== 0n) {
      checkSize(want.sizeBytes, "volume.size_bytes");
      if (want.sizeBytes < srcSize)
        throw invalidArgument(
          "volume.size_bytes",
          `${want.sizeBytes} is smaller than the source (${srcSize})`,
        );
    }
    const size = want.sizeBytes === 0n ? srcSize : want.sizeBytes;
    const s = this.#store(want.store ?? src.store, "volume.store");
    await this.#checkFits(s, size);
    const format: VolumeFormat = want.linked ? "qcow2" : src.format;
    const spec: VolumeSpec = { ...want, store: s.id, format, sizeBytes: size, preallocate: false };
    // The checks above awaited: look again at what may have changed meanwhile.
    const raced = this.#again(id, "volume.clone", opts.requestId, (r) => r.source === srcName);
    if (raced) return raced;
    if (src.state !== "ready") throw notReady(src, "clone");
    if (!want.linked) {
      src.state = "updating";
      src.stateMessage = `being copied to volumes/${id}`;
      return this.#newVolume(
        "volume.clone",
        id,
        s,
        spec,
        { source: srcName },
        opts.requestId,
        async (r, op) => {
          await this.#img.convert(snap?.file ?? src.path, src.format, r.path, r.format, {
            signal: op.signal,
            ...(snap ? { snapshot: snap.id } : {}),
          });
          if (size > srcSize) await this.#img.resize(r.path, r.format, size, op.signal);
        },
        () => this.#settle(src),
      );
    }
    src.state = "updating";
    src.stateMessage = `being frozen for the linked clone volumes/${id}`;
    return this.#newVolume(
      "volume.clone",
      id,
      s,
      spec,
      { source: srcName, backing: srcName },
      opts.requestId,
      async (r, op) => {
        const base = snap ? await this.#snapshotBase(src, snap, op) : await this.#freeze(src, op);
        r.backingFile = base;
        await this.#img.create(r.path, "qcow2", size, {
          backing: { file: base, format: "qcow2" },
          signal: op.signal,
        });
      },
      () => this.#settle(src),
    );
  }

  /** Back to ready after an action on `r` (kept as is when it failed in a way that marked it). */
  async #settle(r: VolumeRecord): Promise<void> {
    if (r.state === "updating") {
      r.state = "ready";
      r.stateMessage = "";
    }
    r.updateTimeMs = this.#now();
    await this.#save(r);
  }

  /** The next unused base path of a volume. */
  async #nextBase(r: VolumeRecord): Promise<string> {
    const p = volumePaths(this.#store(r.store).path, r.id, r.format);
    for (let n = r.bases.length; ; n++) if (!(await exists(p.base(n)))) return p.base(n);
  }

  /**
   * Freezes a qcow2 volume's current content into a read-only base: the file is renamed to the base
   * and a new, empty overlay backed by it takes the volume's path. The volume keeps its path, size and
   * content; from now on its writes go to the overlay. A crash in between is undone by `init`.
   */
  async #freeze(r: VolumeRecord, op: OperationHandle): Promise<string> {
    op.progress(10, `freezing volumes/${r.id} into a read-only base`);
    const base = await this.#nextBase(r);
    r.pending = { kind: "freeze", base };
    await this.#save(r);
    await rename(r.path, base);
    try {
      await this.#img.create(r.path, "qcow2", r.sizeBytes, { backing: { file: base, format: "qcow2" } });
    } catch (err) {
      await rm(r.path, { force: true });
      await rename(base, r.path);
      r.pending = undefined;
      await this.#save(r);
      throw err;
    }
    await chmod(base, 0o440);
    // The volume's snapshots stay in the base file (readable, cloneable, not deletable while frozen).
    for (const sn of r.snapshots as SnapshotRecord[]) if (!sn.file || sn.file === r.path) sn.file = base;
    r.bases.push(base);
    r.pending = undefined;
    await this.#save(r);
    return base;
  }

  /** A read-only qcow2 base holding a snapshot's content, made once per snapshot and shared by its clones. */
  async #snapshotBase(r: VolumeRecord, snap: SnapshotRecord, op: OperationHandle): Promise<string> {
    if (snap.base && (await exists(snap.base))) return snap.base;
    op.progress(10, `copying volumes/${r.id}/snapshots/${snap.id} into a read-only base`);
    const base = await this.#nextBase(r);
    try {
      await this.#img.convert(snap.file ?? r.path, r.format, base, "qcow2", {
        snapshot: snap.id,
        signal: op.signal,
      });
    } catch (err) {
      await rm(base, { force: true });
      throw err;
    }
    await chmod(base, 0o440);
    snap.base = base;
    r.bases.push(base);
    await this.#save(r);
    return base;
  }

  /**
   * The same create again: returns an operation (the running one, or a finished one) when `same`
   * says the existing volume is what was asked for; ALREADY_EXISTS when it is not; undefined when
   * there is no such volume.
   */
  #again(
    id: string,
    kind: string,
    requestId: string | undefined,
    same: (r: VolumeRecord) => boolean,
  ): OperationRecord | undefined {
    const r = this.#volumes.get(id);
    if (!r) return undefined;
    if (!same(r) || r.state === "deleting") throw alreadyExists("volume", `volumes/${id}`);
    const running = this.#creating.get(id);
    if (running && r.state === "creating") return this.d.operations.get(running);
    return this.d.operations.start(
      kind,
      `volumes/${id}`,
      () => this.#view(r),
      requestId ? { requestId } : {},
    );
  }

  /**
   * Records a new volume (state creating) and runs `build` as an operation; when `build` fails nothing
   * is left (file and record removed). `after` runs either way (e.g. to settle a clone's source).
   */
  async #newVolume(
    kind: string,
    id: string,
    s: StoreRecord,
    spec: VolumeSpec,
    from: { source: string; backing?: string },
    requestId: string | undefined,
    build: (r: VolumeRecord, op: OperationHandle) => Promise<void>,
    after?: () => Promise<void>,
  ): Promise<OperationRecord> {
    const t = this.#now();
    const r: VolumeRecord = {
      id,
      store: s.id,
      format: spec.format,
      sizeBytes: spec.sizeBytes,
      backend: spec.backend,
      labels: spec.labels,
      state: "creating",
      stateMessage: "",
      path: volumePaths(s.path, id, spec.format).image,
      source: from.source,
      backing: from.backing ?? "",
      backingFile: "",
      bases: [],
      snapshots: [],
      pending: undefined,
      createTimeMs: t,
      updateTimeMs: t,
    };
    this.#volumes.set(id, r);
    try {
      await this.#records.saveVolume(s.path, r);
    } catch (err) {
      this.#volumes.delete(id);
      await after?.();
      throw err;
    }
    const op = this.d.operations.start(
      kind,
      `volumes/${id}`,
      async (h) => {
        try {
          await build(r, h);
          const info = await this.#img.info(r.path, { format: r.format });
          r.sizeBytes = info.virtualSize;
          r.state = "ready";
          r.updateTimeMs = this.#now();
          await this.#save(r);
          return this.#view(r);
        } catch (err) {
          await rm(r.path, { force: true });
          await this.#records.removeVolume(s.path, r);
          this.#volumes.delete(id);
          throw err;
        } finally {
          this.#creating.delete(id);
          await after?.();
        }
      },
      requestId ? { requestId } : {},
    );
    this.#creating.set(id, op.id);
    return op;
  }

  #save(r: VolumeRecord): Promise<void> {
    return this.#records.saveVolume(this.#store(r.store).path, r);
  }

  // ---- volumes: resize, snapshot, delete -------------------------------------------------------

  /**
   * Grows a volume. A FILE volume that running VMs have open grows live (QMP `block_resize` in their
   * VMMs; the guests see the new size); a daemon-served one in use is refused (its guest could not see
   * it). The same size again is a NOOP.
   */
  async resize(id: string, sizeBytes: bigint, opts: { requestId?: string } = {}): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    checkSize(sizeBytes, "size_bytes");
    const r = this.#volume(id);
    if (sizeBytes === r.sizeBytes)
      return this.d.operations.done("volume.resize", `volumes/${id}`, await this.#view(r));
    if (sizeBytes < r.sizeBytes) {
      throw invalidArgument(
        "size_bytes",
        `volumes/${id} is ${r.sizeBytes} bytes; volumes only grow (asked for ${sizeBytes})`,
        "VOLUME_SHRINK_REFUSED",
      );
    }
    if (r.state !== "ready") throw notReady(r, "resize");
    const live = this.#active(id);
    if (live.length > 0 && r.backend !== "file") {
      // QEMU 7.2's vhost-user-blk export cannot tell its client of a new size (that arrives in QEMU
      // 8.1), and NBD has no resize notice at all: the guest would not see it. Refused, not faked.
      throw failedPrecondition(
        `cannot grow volumes/${id} while ${live[0]} has it open over ${r.backend}: the guest would not see the new size (detach it, or stop the VM, first)`,
        "VOLUME_LIVE_RESIZE_UNSUPPORTED",
        { volume: `volumes/${id}`, vm: live[0] ?? "", backend: r.backend },
      );
    }
    await this.#checkFits(this.#store(r.store), sizeBytes - r.sizeBytes);
    if (r.state !== "ready") throw notReady(r, "resize");
    r.state = "updating";
    r.stateMessage = `growing to ${sizeBytes} bytes`;
    return this.d.operations.start(
      "volume.resize",
      `volumes/${id}`,
      async (op) => {
        try {
          // Whoever has the image open grows it: a storage daemon that still serves it (no VM has it
          // open: see above), else the VMMs that opened the file (their guests see the new size), else
          // qemu-img.
          const daemon = await this.#daemonLocked(id, async () => this.#daemons.get(id)?.daemon);
          if (daemon?.running) {
            op.progress(20, "growing the volume in its storage daemon");
            await daemon.resize(sizeBytes);
          } else if (this.#active(id).length > 0 && r.backend === "file") {
            op.progress(20, "growing the volume in the VMMs that use it");
            const reached = (await this.d.liveResize?.(`volumes/${id}`, sizeBytes)) ?? [];
            if (reached.length === 0) throw inUse(id, this.#active(id), "resize");
          } else {
            await this.#img.resize(r.path, r.format, sizeBytes, op.signal);
          }
          r.sizeBytes = (await this.#img.info(r.path, { format: r.format })).virtualSize;
          return await this.#view(r);
        } finally {
          await this.#settle(r);
        }
      },
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  #snapshot(r: VolumeRecord, sid: string): SnapshotRecord {
    const s = r.snapshots.find((x) => x.id === sid);
    if (!s) throw notFound("volume_snapshot", `volumes/${r.id}/snapshots/${sid}`);
    return s;
  }

  #snapshotView(r: VolumeRecord, s: VolumeSnapshotRecord): VolumeSnapshotView {
    return {
      kind: "volume-snapshot",
      volume: `volumes/${r.id}`,
      snapshot: s,
      clones: clonesOf(r.id, this.#volumes.values(), s.id),
    };
  }

  /**
   * Takes an internal qcow2 snapshot (`qemu-img snapshot -c`) of a volume no VM uses (the live path
   * through the VMM arrives later). Idempotent by id and labels.
   */
  async snapshot(
    id: string,
    sid: string,
    labels: Record<string, string>,
    opts: { requestId?: string } = {},
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    checkId("snapshot", sid, "snapshot_id");
    const r = this.#volume(id);
    const existing = r.snapshots.find((s) => s.id === sid);
    if (existing) {
      if (JSON.stringify(existing.labels) !== JSON.stringify(labels))
        throw alreadyExists("volume_snapshot", `volumes/${id}/snapshots/${sid}`);
      return this.d.operations.done(
        "volume.snapshot",
        `volumes/${id}`,
        this.#snapshotView(r, existing),
        opts.requestId,
      );
    }
    if (r.format !== "qcow2") {
      throw failedPrecondition(
        `volumes/${id} is raw; snapshots need a qcow2 volume`,
        "VOLUME_FORMAT_UNSUPPORTED",
        { volume: `volumes/${id}`, format: r.format },
      );
    }
    if (r.state !== "ready") throw notReady(r, "snapshot");
    const users = this.#users(id);
    if (users.length > 0) throw inUse(id, users, "snapshot");
    r.state = "updating";
    r.stateMessage = `taking snapshot ${sid}`;
    return this.d.operations.start(
      "volume.snapshot",
      `volumes/${id}`,
      async (op) => {
        try {
          await this.#img.snapshotCreate(r.path, sid, op.signal);
          const s: SnapshotRecord = {
            id: sid,
            sizeBytes: r.sizeBytes,
            labels,
            createTimeMs: this.#now(),
            file: r.path,
          };
          r.snapshots.push(s);
          return this.#snapshotView(r, s);
        } finally {
          await this.#settle(r);
        }
      },
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  /** Snapshots of one volume, oldest first; `undefined` = of every volume. */
  listSnapshots(id: string | undefined): VolumeSnapshotView[] {
    const vols =
      id === undefined
        ? [...this.#volumes.values()].sort((a, b) => a.id.localeCompare(b.id))
        : [this.#volume(id)];
    return vols.flatMap((r) =>
      [...r.snapshots].sort((a, b) => a.createTimeMs - b.createTimeMs).map((s) => this.#snapshotView(r, s)),
    );
  }

  async deleteSnapshot(id: string, sid: string): Promise<void> {
    const r = this.#volume(id);
    const s = this.#snapshot(r, sid);
    const clones = clonesOf(id, this.#volumes.values(), sid);
    if (clones.length > 0) {
      throw failedPrecondition(
        `volumes/${id}/snapshots/${sid} is read by the linked clone ${clones[0]}`,
        "VOLUME_SNAPSHOT_HAS_CLONES",
        { volume_snapshot: `volumes/${id}/snapshots/${sid}`, volume: clones[0] ?? "" },
      );
    }
    if (s.file && s.file !== r.path) {
      throw failedPrecondition(
        `volumes/${id}/snapshots/${sid} was frozen into a read-only base by a linked clone; it goes with the volume`,
        "VOLUME_SNAPSHOT_FROZEN",
        { volume_snapshot: `volumes/${id}/snapshots/${sid}` },
      );
    }
    if (r.state !== "ready") throw notReady(r, "delete a snapshot of");
    const users = this.#users(id);
    if (users.length > 0) throw inUse(id, users, "delete a snapshot of");
    r.state = "updating";
    try {
      await this.#img.snapshotDelete(r.path, sid);
      if (s.base) {
        await rm(s.base, { force: true });
        r.bases = r.bases.filter((b) => b !== s.base);
      }
      r.snapshots = r.snapshots.filter((x) => x.id !== sid);
    } finally {
      await this.#settle(r);
    }
  }

  /**
   * Deletes a volume, its file and its bases. Refused while a VM uses it, while a linked clone reads
   * from it or its snapshots, and (without `force`) while it has snapshots.
   */
  async delete(
    id: string,
    opts: { force?: boolean; allowMissing?: boolean; requestId?: string } = {},
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const r = this.#volumes.get(id);
    if (!r) {
      if (opts.allowMissing)
        return this.d.operations.done("volume.delete", `volumes/${id}`, undefined, opts.requestId);
      throw notFound("volume", `volumes/${id}`);
    }
    const users = this.#users(id);
    if (users.length > 0) throw inUse(id, users, "delete");
    const clones = clonesOf(id, this.#volumes.values());
    if (clones.length > 0) {
      throw failedPrecondition(
        `cannot delete volumes/${id}: the linked clone ${clones[0]} reads from it (delete the clones first)`,
        "VOLUME_HAS_CLONES",
        { volume: `volumes/${id}`, clone: clones[0] ?? "" },
      );
    }
    if (r.snapshots.length > 0 && !opts.force) {
      throw failedPrecondition(
        `cannot delete volumes/${id}: it has ${r.snapshots.length} snapshot(s), e.g. ${r.snapshots[0]?.id} (delete with force to drop them too)`,
        "VOLUME_HAS_SNAPSHOTS",
        { volume: `volumes/${id}`, volume_snapshot: `volumes/${id}/snapshots/${r.snapshots[0]?.id}` },
      );
    }
    if (r.state !== "ready" && r.state !== "failed") throw notReady(r, "delete");
    r.state = "deleting";
    const s = this.#store(r.store);
    return this.d.operations.start(
      "volume.delete",
      `volumes/${id}`,
      async () => {
        await this.#save(r);
        await this.#stopDaemon(id);
        await rm(r.path, { force: true });
        for (const b of r.bases) await rm(b, { force: true });
        await this.#records.removeVolume(s.path, r);
        this.#volumes.delete(id);
        return undefined;
      },
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }
}

async function sha256(path: string, signal: AbortSignal): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path, { signal })) h.update(chunk as Buffer);
  return h.digest("hex");
}
