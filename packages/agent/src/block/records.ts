import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { StoreRecord, VolumeFormat, VolumeRecord } from "./domain.js";

/** Version of the JSON layouts; bumped when they change in a way old readers would misread. */
const FORMAT = 1;

const json = (v: unknown) => JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? x.toString() : x), 2);

/** Writes `text` to `path` atomically: a crash leaves the old file or the new one, never half of one. */
async function atomicWrite(path: string, text: string): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, text, { mode: 0o640 });
  await rename(tmp, path);
}

/** Where a volume's files are: `<store>/<id>.<format>` and its record `<store>/<id>.json`. */
export function volumePaths(storePath: string, id: string, format: VolumeFormat) {
  return {
    image: join(storePath, `${id}.${format}`),
    record: join(storePath, `${id}.json`),
    /** The n-th frozen base of the volume (linked clones). Ids have no dots, so these never collide. */
    base: (n: number) => join(storePath, `${id}.base-${n}.qcow2`),
  };
}

/**
 * The block records: stores under `<stateDir>/block/stores/<id>.json`; each volume's record beside its
 * image in its store's directory, so a store's directory is self-describing.
 */
export class BlockRecords {
  readonly storesDir: string;
  constructor(stateDir: string) {
    this.storesDir = join(stateDir, "block", "stores");
  }

  async saveStore(s: StoreRecord): Promise<void> {
    await mkdir(this.storesDir, { recursive: true, mode: 0o750 });
    await atomicWrite(join(this.storesDir, `${s.id}.json`), json({ format: FORMAT, store: s }));
  }

  async removeStore(id: string): Promise<void> {
    await rm(join(this.storesDir, `${id}.json`), { force: true });
  }

  async loadStores(): Promise<StoreRecord[]> {
    const names = await readdir(this.storesDir).catch(() => [] as string[]);
    const out: StoreRecord[] = [];
    for (const n of names.filter((n) => n.endsWith(".json")).sort()) {
      const doc = JSON.parse(await readFile(join(this.storesDir, n), "utf8")) as {
        format: number;
        store: StoreRecord;
      };
      if (doc.format !== FORMAT) throw new Error(`store record ${n}: format ${doc.format} is not known`);
      out.push(doc.store);
    }
    return out;
  }

  readonly #writes = new Map<string, Promise<void>>();

  /** Writes a volume record; the writes of one volume happen in the order they were asked for. */
  saveVolume(storePath: string, r: VolumeRecord): Promise<void> {
    const text = json({ format: FORMAT, volume: r });
    const path = volumePaths(storePath, r.id, r.format).record;
    const write = () => atomicWrite(path, text);
    const next = (this.#writes.get(r.id) ?? Promise.resolve()).then(write, write);
    const settled = next.catch(() => undefined);
    this.#writes.set(r.id, settled);
    void settled.then(() => {
      if (this.#writes.get(r.id) === settled) this.#writes.delete(r.id);
    });
    return next;
  }

  async removeVolume(storePath: string, r: VolumeRecord): Promise<void> {
    await this.#writes.get(r.id);
    await rm(volumePaths(storePath, r.id, r.format).record, { force: true });
  }

  /** The volume records of a store's directory (files `<id>.json` that hold a volume record). */
  async loadVolumes(storePath: string): Promise<VolumeRecord[]> {
    const names = await readdir(storePath).catch(() => [] as string[]);
    const out: VolumeRecord[] = [];
    for (const n of names.filter((n) => /^[a-z][a-z0-9-]*\.json$/.test(n)).sort()) {
      const text = await readFile(join(storePath, n), "utf8").catch(() => undefined);
      if (text === undefined) continue;
      let doc: { format?: number; volume?: VolumeRecord & { sizeBytes: string } };
      try {
        doc = JSON.parse(text);
      } catch {
        continue; // not ours
      }
      if (doc.format !== FORMAT || !doc.volume) continue;
      const v = doc.volume;
      out.push({
        ...v,
        sizeBytes: BigInt(v.sizeBytes),
        snapshots: v.snapshots.map((s) => ({ ...s, sizeBytes: BigInt(s.sizeBytes as unknown as string) })),
      });
    }
    return out;
  }
}
