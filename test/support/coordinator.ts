import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { repoRoot } from "./agent.js";

export const coordinatorMain = join(repoRoot, "packages/coordinator/dist/main.js");

export interface RunningCoordinator {
  dir: string;
  /** LevelDB directory (kept across kill() for a restart on the same `dir`). */
  dataDir: string;
  socket: string;
  /** host:port of the TCP listener. */
  address: string;
  proc: ChildProcess;
  /** Everything the coordinator wrote to stderr so far (its JSON log lines). */
  log(): string;
  /** Resolves with the exit code or signal when the process ends. */
  exited: Promise<number | string | null>;
  /** SIGTERM, wait for exit, remove its state. Safe to call twice. */
  stop(): Promise<void>;
  /** SIGKILL it; its state stays, for a new coordinator on the same `dir`. */
  kill(): Promise<void>;
}

/**
 * Starts a real vmenv-coordinator process on private state (a temporary directory holding its LevelDB
 * and socket, TCP on a free loopback port), waiting until it reports ready. `opts.dir` reuses the state
 * of a coordinator killed before; `opts.keepDir` leaves the state on stop (for the caller to remove).
 */
export async function startCoordinator(
  extraArgs: string[] = [],
  env: NodeJS.ProcessEnv = {},
  opts: {
    dir?: string;
    keepDir?: boolean;
    /** Run the coordinator in this network namespace (it reaches agents' TCP addresses from there). */
    netns?: string;
  } = {},
): Promise<RunningCoordinator> {
  const dir = opts.dir ?? (await mkdtemp(join(tmpdir(), "vmenv-coord-test-")));
  const socket = join(dir, "coordinator.sock");
  const dataDir = join(dir, "db");
  const args = [coordinatorMain, "--data-dir", dataDir, "--socket", socket, "--listen", "127.0.0.1:0"];
  const proc = spawn(
    opts.netns ? "ip" : process.execPath,
    [...(opts.netns ? ["netns", "exec", opts.netns, process.execPath] : []), ...args, ...extraArgs],
    { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  proc.stderr?.setEncoding("utf8");
  const exited = new Promise<number | string | null>((r) =>
    proc.once("exit", (code, signal) => r(code ?? signal)),
  );
  const ready = new Promise<string>((resolveReady, reject) => {
    proc.stderr?.on("data", (d: string) => {
      stderr += d;
      for (const line of stderr.split("\n")) {
        if (!line.startsWith("{")) continue;
        try {
          const j = JSON.parse(line) as { msg?: string; tcpAddress?: string };
          if (j.msg === "vmenv-coordinator ready") resolveReady(j.tcpAddress ?? "");
        } catch {
          // a line still being written
        }
      }
    });
    exited.then(
      (code) => reject(new Error(`coordinator exited with ${code} before it was ready:\n${stderr}`)),
      reject,
    );
    setTimeout(() => reject(new Error(`coordinator not ready after 20s:\n${stderr}`)), 20_000).unref();
  });
  let stopped: Promise<void> | undefined;
  const c: RunningCoordinator = {
    dir,
    dataDir,
    socket,
    address: "",
    proc,
    exited,
    log: () => stderr,
    stop: () =>
      (stopped ??= (async () => {
        if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
        await exited;
        clearTimeout(t);
        const errors = stderr.split("\n").filter((l) => l.includes('"level":50'));
        if (errors.length > 0)
          process.stderr.write(`coordinator ${dir} logged errors:\n${errors.join("\n")}\n`);
        if (!opts.keepDir) await rm(dir, { recursive: true, force: true });
      })()),
    kill: async () => {
      proc.kill("SIGKILL");
      await exited;
    },
  };
  try {
    c.address = await ready;
  } catch (err) {
    await c.stop();
    throw err;
  }
  return c;
}
