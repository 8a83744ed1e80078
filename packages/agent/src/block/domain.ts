/**
 * The block domain: stores, volumes and their snapshots, names, validation and capacity arithmetic.
 * Plain TypeScript, no I/O.
 */
import { invalidArgument, VmenvError } from "@vmenv/rpc/errors";

export type VolumeFormat = "raw" | "qcow2";
export type VolumeBackendKind = "file" | "vhost-user-blk" | "nbd";
export type VolumeState = "creating" | "ready" | "updating" | "deleting" | "failed";

/** The store every agent has: `<stateDir>/volumes`, made at start when missing. */
export const DEFAULT_STORE = "default";

/** A store as the agent keeps it (`<stateDir>/block/stores/<id>.json`). */
export interface StoreRecord {
  id: string;
  /** Absolute, normalised path of the directory. */
  path: string;
  shared: boolean;
  labels: Record<string, string>;
  createTimeMs: number;
}

/** A volume snapshot: an internal qcow2 snapshot of the volume's file, tagged with its id. */
export interface VolumeSnapshotRecord {
  id: string;
  sizeBytes: bigint;
  labels: Record<string, string>;
  createTimeMs: number;
}

/**
 * A step that touches several files and must be finished or undone after a crash: freezing a volume's
 * content into a read-only base for a linked clone (the volume's file is renamed to `base`, then a new
 * overlay backed by it takes the volume's path).
 */
export interface PendingFreeze {
  kind: "freeze";
  base: string;
}

/** A volume as the agent keeps it (`<store>/<id>.json`, beside its image `<store>/<id>.<format>`). */
export interface VolumeRecord {
  id: string;
  store: string;
  format: VolumeFormat;
  sizeBytes: bigint;
  backend: VolumeBackendKind;
  labels: Record<string, string>;
  state: VolumeState;
  stateMessage: string;
  /** Absolute path of the image file. */
  path: string;
  /** What it was made from: image path of an import, volume or snapshot name of a clone; "" when blank. */
  source: string;
  /** Linked clones: the volume or snapshot it reads unchanged data from (`volumes/x[/snapshots/s]`). */
  backing: string;
  /** Linked clones: the read-only file its overlay is backed by. */
  backingFile: string;
  /** Read-only base files this volume owns (its frozen content, read by its linked clones and by itself). */
  bases: string[];
  snapshots: VolumeSnapshotRecord[];
  pending: PendingFreeze | undefined;
  createTimeMs: number;
  updateTimeMs: number;
}

/** What a caller asks for in CreateVolume; compared for idempotency. */
export interface VolumeSpec {
  store: string;
  format: VolumeFormat;
  sizeBytes: bigint;
  backend: VolumeBackendKind;
  labels: Record<string, string>;
  preallocate: boolean;
}

/** AIP-122 style ids: lower-case letters, digits and hyphens, starting with a letter, at most 63. */
const ID = /^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;
const ID_RULE =
  "use 1-63 lower-case letters, digits and hyphens, starting with a letter and not ending with a hyphen";

export function checkId(kind: "store" | "volume" | "snapshot", id: string, field: string): void {
  if (!ID.test(id)) {
    throw invalidArgument(
      field,
      `"${id.slice(0, 80)}" is not a valid ${kind} id: ${ID_RULE}`,
      `INVALID_${kind.toUpperCase()}_ID`,
    );
  }
}

function idFromName(kind: "store" | "volume", name: string, field: string): string {
  const prefix = kind === "store" ? "stores/" : "volumes/";
  if (!name.startsWith(prefix) || name.length === prefix.length) {
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a ${kind} name (${prefix}{${kind}})`,
      `INVALID_${kind.toUpperCase()}_NAME`,
    );
  }
  const id = name.slice(prefix.length);
  checkId(kind, id, field);
  return id;
}

/** `stores/{id}` → id, or INVALID_ARGUMENT naming the field. */
export const storeIdFromName = (name: string, field = "name") => idFromName("store", name, field);
/** `volumes/{id}` → id, or INVALID_ARGUMENT naming the field. */
export const volumeIdFromName = (name: string, field = "name") => idFromName("volume", name, field);

/** `volumes/{v}/snapshots/{s}` → [v, s], or INVALID_ARGUMENT naming the field. */
export function snapshotFromName(name: string, field = "name"): [string, string] {
  const m = /^volumes\/([^/]+)\/snapshots\/([^/]+)$/.exec(name);
  if (!m?.[1] || !m[2]) {
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a volume snapshot name (volumes/{volume}/snapshots/{snapshot})`,
      "INVALID_VOLUME_SNAPSHOT_NAME",
    );
  }
  checkId("volume", m[1], field);
  checkId("snapshot", m[2], field);
  return [m[1], m[2]];
}

/** `volumes/{v}` or `volumes/{v}/snapshots/{s}` (a clone's source). */
export function sourceFromName(
  name: string,
  field: string,
): { volume: string; snapshot: string | undefined } {
  if (name.includes("/snapshots/")) {
    const [volume, snapshot] = snapshotFromName(name, field);
    return { volume, snapshot };
  }
  return { volume: volumeIdFromName(name, field), snapshot: undefined };
}

/** An absolute path with no `..` component, NUL or newline; normalised (no trailing slash, no `//`). */
export function checkAbsolutePath(path: string, field: string): string {
  if (!path.startsWith("/")) throw invalidArgument(field, `"${path.slice(0, 200)}" must be an absolute path`);
  if (/[\0\n]/.test(path)) throw invalidArgument(field, "must not contain NUL or newline characters");
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) throw invalidArgument(field, `"${path.slice(0, 200)}" must not contain ".."`);
  return `/${parts.join("/")}`;
}

export const SECTOR = 512n;
/** qemu-img's own ceiling for a virtual size (2^63 - 512). */
export const MAX_SIZE_BYTES = (1n << 63n) - SECTOR;

/** A size is positive and a multiple of 512; INVALID_ARGUMENT naming the field otherwise. */
export function checkSize(size: bigint, field: string): void {
  if (size <= 0n) throw invalidArgument(field, "must be more than 0");
  if (size % SECTOR !== 0n) throw invalidArgument(field, `must be a multiple of 512, got ${size}`);
  if (size > MAX_SIZE_BYTES) throw invalidArgument(field, `${size} is larger than any volume can be`);
}

/**
 * Capacity rule (ADR 0007): stores are thin-provisioned (the sum of the volumes' sizes may exceed the
 * filesystem), but one volume, when full, must fit in the space the filesystem has free now. Otherwise
 * RESOURCE_EXHAUSTED naming the store and the numbers.
 */
export function checkFits(store: string, sizeBytes: bigint, freeBytes: bigint, capacityBytes: bigint): void {
  if (sizeBytes <= freeBytes) return;
  throw new VmenvError(
    "resource-exhausted",
    `stores/${store} has ${freeBytes} bytes free (of ${capacityBytes}); a volume of ${sizeBytes} bytes does not fit`,
    {
      reason: "STORE_CAPACITY_EXCEEDED",
      metadata: {
        store: `stores/${store}`,
        requested_bytes: String(sizeBytes),
        free_bytes: String(freeBytes),
        capacity_bytes: String(capacityBytes),
      },
    },
  );
}

/** Whether two normalised specs ask for the same volume. */
export function sameVolumeSpec(a: VolumeSpec, b: VolumeSpec): boolean {
  return canonical(a) === canonical(b);
}

/** The spec a record answers to (for a repeated CreateVolume). */
export function specOf(r: VolumeRecord, preallocate: boolean): VolumeSpec {
  return {
    store: r.store,
    format: r.format,
    sizeBytes: r.sizeBytes,
    backend: r.backend,
    labels: r.labels,
    preallocate,
  };
}

function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) => {
    if (typeof x === "bigint") return `${x}n`;
    if (x && typeof x === "object" && !Array.isArray(x))
      return Object.fromEntries(Object.entries(x).sort(([a], [b]) => a.localeCompare(b)));
    return x;
  });
}

/** Two stores are the same ask when path, sharing and labels agree. */
export function sameStore(
  a: Pick<StoreRecord, "path" | "shared" | "labels">,
  b: Pick<StoreRecord, "path" | "shared" | "labels">,
): boolean {
  return canonical([a.path, a.shared, a.labels]) === canonical([b.path, b.shared, b.labels]);
}

/** The volumes (by name) whose linked-clone overlay reads from `volume` or one of its snapshots. */
export function clonesOf(volume: string, all: Iterable<VolumeRecord>, snapshot?: string): string[] {
  const target = snapshot ? `volumes/${volume}/snapshots/${snapshot}` : undefined;
  const out: string[] = [];
  for (const r of all) {
    if (!r.backing) continue;
    if (
      target
        ? r.backing === target
        : r.backing === `volumes/${volume}` || r.backing.startsWith(`volumes/${volume}/`)
    )
      out.push(`volumes/${r.id}`);
  }
  return out.sort();
}

/** VolumeUsers may answer `vms/x` or `x`; the API speaks `vms/x`. */
export function vmName(user: string): string {
  return user.startsWith("vms/") ? user : `vms/${user}`;
}

/** FAILED_PRECONDITION naming the first VM that uses the volume. */
export function inUse(volume: string, users: string[], action: string): VmenvError {
  const vm = vmName(users[0] ?? "");
  return new VmenvError(
    "failed-precondition",
    `cannot ${action} volumes/${volume}: ${vm} uses it${users.length > 1 ? ` (and ${users.length - 1} more)` : ""}`,
    { reason: "VOLUME_IN_USE", metadata: { volume: `volumes/${volume}`, vm } },
  );
}

/** FAILED_PRECONDITION: the volume is busy with another action or not usable. */
export function notReady(r: VolumeRecord, action: string): VmenvError {
  return new VmenvError(
    "failed-precondition",
    `cannot ${action} volumes/${r.id}: it is ${r.state}${r.stateMessage ? ` (${r.stateMessage})` : ""}`,
    { reason: "VOLUME_NOT_READY", metadata: { volume: `volumes/${r.id}`, state: r.state } },
  );
}
