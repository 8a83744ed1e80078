import { run } from "./agent.js";

/** Pids of the qemu-storage-daemon processes of the agent state under `dir`. */
export async function daemonsUnder(dir: string): Promise<number[]> {
  const r = await run("pgrep", ["-f", `qemu-storage-daemon.*${dir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}/`]);
  return r.stdout.split("\n").filter(Boolean).map(Number);
}
