import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { VmRecord } from "./domain.js";
import type { VmPaths } from "./driver.js";

/** Version of vm.json's layout; bumped when it changes in a way old readers would misread. */
const FORMAT = 1;

/**
 * The VMs' folders under `<state>/vms/<id>/`: vm.json (the record), qmp.sock, serial.sock, serial.log,
 * qemu.pid. The folder is the VM: the agent keeps nothing else about it.
 */
export class VmStore {
  readonly root: string;
  constructor(stateDir: string) {
    this.root = join(stateDir, "vms");
  }

  paths(id: string): VmPaths {
    const dir = join(this.root, id);
    return {
      dir,
      record: join(dir, "vm.json"),
      control: join(dir, "qmp.sock"),
      serialSocket: join(dir, "serial.sock"),
      serialLog: join(dir, "serial.log"),
      pidFile: join(dir, "vmm.pid"),
    };
  }

  readonly #writes = new Map<string, Promise<void>>();

  /**
   * Writes the record atomically (a crash leaves the old one or the new one, never half of one). Writes
   * of one VM happen in the order they were asked for.
   */
  save(r: VmRecord): Promise<void> {
    const p = this.paths(r.id);
    const text = JSON.stringify(
      { format: FORMAT, vm: r },
      (_k, v) => (typeof v === "bigint" ? v.toString() : v),
      2,
    );
    const write = async () => {
      await mkdir(p.dir, { recursive: true, mode: 0o750 });
      const tmp = `${p.record}.${process.pid}.tmp`;
      await writeFile(tmp, text);
      await rename(tmp, p.record);
    };
    const next = (this.#writes.get(r.id) ?? Promise.resolve()).then(write, write);
    const settled = next.catch(() => undefined);
    this.#writes.set(r.id, settled);
    void settled.then(() => {
      if (this.#writes.get(r.id) === settled) this.#writes.delete(r.id);
    });
    return next;
  }

  /** Every VM folder: its record, or undefined for a folder with none (a create cut short). */
  async loadAll(): Promise<{ id: string; record: VmRecord | undefined }[]> {
    const ids = await readdir(this.root).catch(() => [] as string[]);
    const out: { id: string; record: VmRecord | undefined }[] = [];
    for (const id of ids.sort()) {
      const text = await readFile(this.paths(id).record, "utf8").catch(() => undefined);
      out.push({ id, record: text === undefined ? undefined : revive(JSON.parse(text)) });
    }
    return out;
  }

  async remove(id: string): Promise<void> {
    await this.#writes.get(id);
    await rm(this.paths(id).dir, { recursive: true, force: true });
  }
}

function revive(doc: {
  format: number;
  vm: VmRecord & { spec: { memoryBytes: string; maxMemoryBytes: string } };
}): VmRecord {
  if (doc.format !== FORMAT)
    throw new Error(`vm.json format ${doc.format} is not known to this agent (knows ${FORMAT})`);
  const vm = doc.vm;
  return {
    ...vm,
    devices: vm.devices ?? [],
    spec: {
      ...vm.spec,
      memoryBytes: BigInt(vm.spec.memoryBytes),
      maxMemoryBytes: BigInt(vm.spec.maxMemoryBytes),
    },
  };
}
