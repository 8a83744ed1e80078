import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

export const repoRoot = resolve(import.meta.dirname, "../..");
export const agentMain = join(repoRoot, "packages/agent/dist/main.js");
export const cliMain = join(repoRoot, "packages/cli/dist/main.js");

export interface RunningAgent {
  dir: string;
  socket: string;
  /** host:port of the TCP listener. */
  address: string;
  proc: ChildProcess;
  /** Everything the agent wrote to stderr so far (its JSON log lines). */
  log(): string;
  /**
   * SIGTERM, wait for exit, kill the VMs it left running (their VMMs outlive the agent by design),
   * remove its state. Safe to call twice.
   */
  stop(): Promise<number | null>;
  /** SIGKILL the agent only: its VMs and state stay, for a new agent on the same `dir`. */
  kill(): Promise<void>;
}

/**
 * Starts a real vmenv-agent process on private state (a temporary directory, a socket inside it, TCP on
 * a free loopback port, TCG so no probe decides anything), waiting until it reports ready.
 */
export async function startAgent(
  extraArgs: string[] = [],
  env: NodeJS.ProcessEnv = {},
  opts: {
    dir?: string;
    /** Run the agent (and so its VMMs, bridges, taps, nft table) in this network namespace. */
    netns?: string;
    /** The TCP listen address (default 127.0.0.1:0); incoming migrations listen on its host too. */
    listen?: string;
  } = {},
): Promise<RunningAgent> {
  const dir = opts.dir ?? (await mkdtemp(join(tmpdir(), "vmenv-agent-test-")));
  const socket = join(dir, "agent.sock");
  const proc = spawn(
    opts.netns ? "ip" : process.execPath,
    [
      ...(opts.netns ? ["netns", "exec", opts.netns, process.execPath] : []),
      agentMain,
      "--state-dir",
      join(dir, "state"),
      "--socket",
      socket,
      "--listen",
      opts.listen ?? "127.0.0.1:0",
      "--accelerator",
      "tcg",
      ...extraArgs,
    ],
    { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  proc.stderr?.setEncoding("utf8");
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  const ready = new Promise<string>((resolveReady, reject) => {
    proc.stderr?.on("data", (d: string) => {
      stderr += d;
      for (const line of stderr.split("\n")) {
        if (!line.startsWith("{")) continue;
        const j = JSON.parse(line) as { msg?: string; tcpAddress?: string };
        if (j.msg === "vmenv-agent ready") resolveReady(j.tcpAddress ?? "");
      }
    });
    exited.then(
      (code) => reject(new Error(`agent exited with ${code} before it was ready:\n${stderr}`)),
      reject,
    );
    setTimeout(() => reject(new Error(`agent not ready after 20s:\n${stderr}`)), 20_000).unref();
  });
  let stopped: Promise<number | null> | undefined;
  const agent: RunningAgent = {
    dir,
    socket,
    address: "",
    proc,
    log: () => stderr,
    kill: async () => undefined,
    stop: () =>
      (stopped ??= (async () => {
        if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
        const code = await exited;
        clearTimeout(t);
        // The agent's errors, where a failing test's reader will look for them.
        const errors = stderr.split("\n").filter((l) => l.includes('"level":50'));
        if (errors.length > 0) process.stderr.write(`agent ${dir} logged errors:\n${errors.join("\n")}\n`);
        await killProcessesUnder(dir);
        await rm(dir, { recursive: true, force: true });
        return code;
      })()),
  };
  agent.kill = async () => {
    proc.kill("SIGKILL");
    await exited;
  };
  try {
    agent.address = await ready;
  } catch (err) {
    await agent.stop();
    throw err;
  }
  return agent;
}

/** Runs a command with arguments (never through a shell); resolves with its exit code and output. */
export function run(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolveRun, reject) => {
    const p = spawn(cmd, args, { env: { ...process.env, ...opts.env }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const t = setTimeout(() => p.kill("SIGKILL"), opts.timeoutMs ?? 60_000);
    p.once("error", reject);
    p.once("close", (code) => {
      clearTimeout(t);
      resolveRun({ code, stdout, stderr });
    });
  });
}

/** Pids of the processes whose command line mentions `dir` (the VMMs of an agent on that state). */
export async function processesUnder(dir: string): Promise<number[]> {
  const r = await run("pgrep", ["-f", dir]);
  return r.stdout
    .split("\n")
    .filter(Boolean)
    .map(Number)
    .filter((p) => p !== process.pid);
}

/** SIGKILLs every process whose command line mentions `dir`, and waits until they are gone. */
export async function killProcessesUnder(dir: string): Promise<void> {
  for (let i = 0; i < 50; i++) {
    const pids = await processesUnder(dir);
    if (pids.length === 0) return;
    for (const p of pids) {
      try {
        process.kill(p, "SIGKILL");
      } catch {
        // already gone
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
