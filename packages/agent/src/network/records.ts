import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { NetworkRecord, PortRecord } from "./domain.js";

/** Version of the JSON layout; bumped when it changes in a way old readers would misread. */
const FORMAT = 1;

/** A network and its ports: one file, so that an address allocation and its port are written together. */
export interface NetworkDoc {
  network: NetworkRecord;
  ports: PortRecord[];
}

/** Writes `text` to `path` atomically: a crash leaves the old file or the new one, never half of one. */
async function atomicWrite(path: string, text: string): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, text, { mode: 0o640 });
  await rename(tmp, path);
}

/** The network records: `<stateDir>/networks/<id>.json`, each with the network's ports. */
export class NetworkRecords {
  readonly dir: string;
  constructor(stateDir: string) {
    this.dir = join(stateDir, "networks");
  }

  async save(doc: NetworkDoc): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o750 });
    const ports = [...doc.ports].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    await atomicWrite(
      join(this.dir, `${doc.network.id}.json`),
      JSON.stringify({ format: FORMAT, network: doc.network, ports }, null, 2),
    );
  }

  async remove(id: string): Promise<void> {
    await rm(join(this.dir, `${id}.json`), { force: true });
  }

  async load(): Promise<NetworkDoc[]> {
    const names = await readdir(this.dir).catch(() => [] as string[]);
    const out: NetworkDoc[] = [];
    for (const n of names.filter((n) => /^[a-z][a-z0-9-]*\.json$/.test(n)).sort()) {
      const doc = JSON.parse(await readFile(join(this.dir, n), "utf8")) as NetworkDoc & { format: number };
      if (doc.format !== FORMAT) throw new Error(`network record ${n}: format ${doc.format} is not known`);
      out.push({ network: doc.network, ports: doc.ports ?? [] });
    }
    return out;
  }
}
