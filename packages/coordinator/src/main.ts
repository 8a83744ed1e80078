#!/usr/bin/env node
import { ConfigError, coordinatorCommand, resolveConfig } from "./config.js";
import { COORDINATOR_VERSION } from "./version.js";
import { type Coordinator, startCoordinator } from "./wire.js";

/** Entry point of vmenv-coordinator: parse settings, start, stop gracefully on SIGTERM/SIGINT. */
async function main(): Promise<void> {
  const cmd = coordinatorCommand(COORDINATOR_VERSION);
  cmd.parse(process.argv);
  let coordinator: Coordinator;
  try {
    coordinator = await startCoordinator(resolveConfig(cmd));
  } catch (err) {
    const e = err as Error & { reason?: string };
    const kind = err instanceof ConfigError ? "bad configuration" : "cannot start";
    process.stderr.write(`vmenv-coordinator: ${kind}: ${e.message}${e.reason ? ` (${e.reason})` : ""}\n`);
    process.exit(err instanceof ConfigError ? 2 : 1);
  }
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    coordinator.logger.info({ signal }, "vmenv-coordinator stopping");
    coordinator.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        coordinator.logger.error({ err }, "vmenv-coordinator did not stop cleanly");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}

await main();
