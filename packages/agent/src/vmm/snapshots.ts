import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import * as net from "node:net";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import type { VmSpec, VmState } from "./domain.js";

/** A VM snapshot as the agent keeps it: `vms/<vm>/snapshots/<id>/{snapshot.json,state.bin}`. */
export interface SnapshotRecord {
  vmId: string;
  id: string;
  spec: VmSpec;
  vmState: VmState;
  includesMemory: boolean;
  memoryStateBytes: number;
  guestReady: boolean;
  labels: Record<string, string>;
  createTimeMs: number;
}

export function snapshotDir(vmDir: string, id: string): string {
  return join(vmDir, "snapshots", id);
}

export async function saveSnapshotRecord(vmDir: string, r: SnapshotRecord): Promise<void> {
  const dir = snapshotDir(vmDir, r.id);
  const tmp = join(dir, "snapshot.json.tmp");
  await writeFile(
    tmp,
    JSON.stringify(r, (_k, v) => (typeof v === "bigint" ? v.toString() : v), 2),
  );
  await rename(tmp, join(dir, "snapshot.json"));
}

export async function loadSnapshots(vmDir: string): Promise<SnapshotRecord[]> {
  const ids = await readdir(join(vmDir, "snapshots")).catch(() => [] as string[]);
  const out: SnapshotRecord[] = [];
  for (const id of ids) {
    const text = await readFile(join(snapshotDir(vmDir, id), "snapshot.json"), "utf8").catch(() => undefined);
    if (text === undefined) continue; // a snapshot cut short: not listed
    const r = JSON.parse(text) as SnapshotRecord & { spec: { memoryBytes: string; maxMemoryBytes: string } };
    out.push({
      ...r,
      spec: {
        ...r.spec,
        memoryBytes: BigInt(r.spec.memoryBytes),
        maxMemoryBytes: BigInt(r.spec.maxMemoryBytes),
      },
    });
  }
  return out.sort((a, b) => a.createTimeMs - b.createTimeMs);
}

export async function removeSnapshot(vmDir: string, id: string): Promise<void> {
  await rm(snapshotDir(vmDir, id), { recursive: true, force: true });
}

/**
 * Listens on a Unix socket and writes what the first connection sends into `file`. `save` makes the
 * VMM send its state there; the returned promise resolves with the bytes written once both are done.
 */
export async function receiveInto(
  socketPath: string,
  file: string,
  save: () => Promise<void>,
): Promise<number> {
  await mkdir(join(file, ".."), { recursive: true });
  await rm(socketPath, { force: true });
  const server = net.createServer();
  const received = new Promise<void>((resolve, reject) => {
    server.once("connection", (conn) => {
      server.close();
      pipeline(conn, createWriteStream(file)).then(resolve, reject);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socketPath, resolve);
  });
  try {
    await save();
    await received;
  } finally {
    server.close();
    await rm(socketPath, { force: true });
  }
  return (await stat(file)).size;
}

/** Connects to the VMM's incoming socket (retrying until it listens) and streams `file` into it. */
export async function sendFrom(file: string, socketPath: string): Promise<void> {
  let conn: net.Socket | undefined;
  for (let i = 0; i < 200 && !conn; i++) {
    conn = await new Promise<net.Socket | undefined>((resolve) => {
      const s = net.connect({ path: socketPath });
      s.once("connect", () => resolve(s));
      s.once("error", () => resolve(undefined));
    });
    if (!conn) await new Promise((r) => setTimeout(r, 50));
  }
  if (!conn) throw new Error(`the VMM did not listen on ${socketPath} for its state`);
  await pipeline(createReadStream(file), conn);
}
