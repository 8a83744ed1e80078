/**
 * Live migration, the part without I/O: settings, progress, the URIs the two agents exchange, and what
 * a VMM must offer to take part. The orchestration is in migration.ts, QEMU's side in qemu/migration.ts.
 */
import { invalidArgument } from "@vmenv/rpc/errors";

/** How a migration is tuned (MigrationSettings of the API, defaults filled in). */
export interface MigrationSettings {
  /** Bytes per second; undefined: the VMM's default. */
  maxBandwidthBytesPerSecond: number | undefined;
  downtimeLimitMs: number;
  /** undefined: no limit. */
  timeoutMs: number | undefined;
  autoConverge: boolean;
  postCopy: boolean;
}

export const DEFAULT_DOWNTIME_LIMIT_MS = 300;

export type MigrationPhase = "storage" | "pre-copy" | "post-copy" | "switchover" | "completed";

/** What a running outgoing migration reports (VmMigrationProgress of the API). */
export interface MigrationProgress {
  phase: MigrationPhase;
  storageTransferredBytes: number;
  storageTotalBytes: number;
  memoryTransferredBytes: number;
  memoryRemainingBytes: number;
  memoryTotalBytes: number;
  dirtyRateBytesPerSecond: number;
  iterations: number;
  expectedDowntimeMs: number;
  cpuThrottlePercent: number;
}

/** What the destination answers PrepareVmMigration with (VmMigrationTarget of the API). */
export interface MigrationTarget {
  vm: string;
  migrationUri: string;
  storageUri: string;
}

/** How an outgoing migration ended, as the VMM measured it. */
export interface MigrationOutcome {
  totalTimeMs: number;
  downtimeMs: number;
}

/** Where the destination's NBD server is. */
export type NbdServer = { type: "inet"; host: string; port: string } | { type: "unix"; path: string };

/** What a VMM offers for live migration (QEMU; cloud-hypervisor has no implementation yet). */
export interface VmmMigration {
  /** Destination: listens for the incoming stream on `host`, on a port the VMM picks; answers "tcp:host:port". */
  listen(host: string): Promise<string>;
  /** Destination: exports these disks (device ids; export name = id) writable over NBD on `host`; answers the URI. */
  exportDisks(host: string, diskIds: string[]): Promise<string>;
  /** Destination: stops the NBD server (a no-op when none runs). */
  stopExport(): Promise<void>;
  /** Destination: where the incoming migration is; `error` says why it failed. */
  incoming(): Promise<{ status: "waiting" | "active" | "completed" | "failed"; error?: string }>;
  /** Waits at most `ms`, returning early when the migration's status changes (both ends). */
  nextChange(ms: number): Promise<void>;
  /**
   * Source: sends the VM to `uri`, first mirroring `disks` into the NBD server at `storage` when given.
   * Resolves once the destination holds the complete state (the source is then paused, its disks
   * released). On failure, cancel (`signal`) or timeout, everything is undone and the guest runs on
   * (when it ran before), and the error is thrown.
   */
  send(req: {
    uri: string;
    storage: NbdServer | undefined;
    disks: string[];
    settings: MigrationSettings;
    wasRunning: boolean;
    onProgress: (p: MigrationProgress) => void;
    signal: AbortSignal;
  }): Promise<MigrationOutcome>;
  /**
   * Source, after an agent restart cut `send` short: cancels a migration still running and undoes it
   * like a failure ("rolled-back", the guest runs again when it ran before), or tells that it had
   * completed ("completed": the destination holds the complete state; the source stays paused).
   */
  settle(wasRunning: boolean): Promise<"completed" | "rolled-back">;
  /**
   * Source: whether the last migration went to post-copy. The guest then ran on the destination from the
   * switch on, and this copy is out of date: it must never run again.
   */
  wentPostcopy(): Promise<boolean>;
}

const HOST = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)$/;

/** "tcp:host:port" → the same, checked (the only migration transport between agents). */
export function checkMigrationUri(uri: string, field = "migration_uri"): string {
  const m = /^tcp:(.+):(\d{1,5})$/.exec(uri);
  if (!m?.[1] || !HOST.test(m[1]) || Number(m[2]) < 1 || Number(m[2]) > 65535) {
    throw invalidArgument(
      field,
      `"${uri.slice(0, 120)}" is not a migration address: use tcp:host:port, as VmMigrationTarget.migration_uri gives it`,
      "INVALID_MIGRATION_URI",
    );
  }
  return uri;
}

/** "nbd://host:port" or "nbd:unix:/path" → the NBD server; INVALID_ARGUMENT otherwise. */
export function parseStorageUri(uri: string, field = "storage_uri"): NbdServer {
  const inet = /^nbd:\/\/(.+):(\d{1,5})\/?$/.exec(uri);
  if (inet?.[1] && HOST.test(inet[1]) && Number(inet[2]) >= 1 && Number(inet[2]) <= 65535) {
    return { type: "inet", host: inet[1].replace(/^\[(.*)\]$/, "$1"), port: String(Number(inet[2])) };
  }
  const unix = /^nbd:unix:(\/[^\0\n]+)$/.exec(uri);
  if (unix?.[1]) return { type: "unix", path: unix[1] };
  throw invalidArgument(
    field,
    `"${uri.slice(0, 120)}" is not an NBD address: use nbd://host:port or nbd:unix:/path, as VmMigrationTarget.storage_uri gives it`,
    "INVALID_STORAGE_URI",
  );
}

/** A host as it goes into a URI: IPv6 addresses in brackets. */
export function uriHost(host: string): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
}

/** The overall percentage of a migration, for the operation's progress: storage first, then memory. */
export function migrationPercent(p: MigrationProgress, withStorage: boolean): number {
  const share = (done: number, total: number) => (total > 0 ? Math.min(1, done / total) : 0);
  const storage = withStorage ? share(p.storageTransferredBytes, p.storageTotalBytes) : 1;
  const memoryTotal = p.memoryTransferredBytes + p.memoryRemainingBytes;
  const memory = p.phase === "storage" ? 0 : share(p.memoryTransferredBytes, memoryTotal);
  if (p.phase === "completed") return 100;
  const pct = withStorage ? 40 * storage + 59 * memory : 99 * memory;
  return Math.floor(Math.max(0, Math.min(99, pct)));
}

/** QEMU's `query-migrate` answer, the fields we read. */
export interface QueryMigrate {
  status?: string;
  "error-desc"?: string;
  "total-time"?: number;
  downtime?: number;
  "expected-downtime"?: number;
  "cpu-throttle-percentage"?: number;
  ram?: {
    transferred?: number;
    remaining?: number;
    total?: number;
    "dirty-pages-rate"?: number;
    "page-size"?: number;
    "dirty-sync-count"?: number;
    "postcopy-bytes"?: number;
    "postcopy-requests"?: number;
  };
}

/** A `query-migrate` answer → progress (storage figures passed in from the block jobs). */
export function progressFromQuery(
  q: QueryMigrate,
  storage: { transferred: number; total: number },
): MigrationProgress {
  const ram = q.ram ?? {};
  const phase: MigrationPhase =
    q.status === "completed"
      ? "completed"
      : q.status === "postcopy-active" || q.status === "postcopy-paused" || q.status === "postcopy-recover"
        ? "post-copy"
        : q.status === "pre-switchover" || q.status === "device"
          ? "switchover"
          : "pre-copy";
  return {
    phase,
    storageTransferredBytes: storage.transferred,
    storageTotalBytes: storage.total,
    memoryTransferredBytes: ram.transferred ?? 0,
    memoryRemainingBytes: ram.remaining ?? 0,
    memoryTotalBytes: ram.total ?? 0,
    dirtyRateBytesPerSecond: (ram["dirty-pages-rate"] ?? 0) * (ram["page-size"] ?? 4096),
    iterations: ram["dirty-sync-count"] ?? 0,
    expectedDowntimeMs: q["expected-downtime"] ?? 0,
    cpuThrottlePercent: q["cpu-throttle-percentage"] ?? 0,
  };
}
