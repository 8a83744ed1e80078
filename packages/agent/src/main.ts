#!/usr/bin/env node
import { agentCommand, ConfigError, resolveConfig } from "./config.js";
import { AGENT_VERSION } from "./version.js";
import { startAgent } from "./wire.js";

/** Entry point of vmenv-agent: parse settings, start, stop gracefully on SIGTERM/SIGINT. */
async function main(): Promise<void> {
  const cmd = agentCommand(AGENT_VERSION);
  cmd.parse(process.argv);
  let agent: Awaited<ReturnType<typeof startAgent>>;
  try {
    agent = await startAgent(await resolveConfig(cmd));
  } catch (err) {
    // One clear line for the operator; the exit code says it failed.
    const e = err as Error & { reason?: string };
    const kind = err instanceof ConfigError ? "bad configuration" : "cannot start";
    process.stderr.write(`vmenv-agent: ${kind}: ${e.message}${e.reason ? ` (${e.reason})` : ""}\n`);
    process.exit(err instanceof ConfigError ? 2 : 1);
  }
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    agent.logger.info({ signal }, "vmenv-agent stopping");
    agent.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        agent.logger.error({ err }, "vmenv-agent did not stop cleanly");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}

await main();
