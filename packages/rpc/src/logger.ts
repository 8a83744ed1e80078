import pino, { type DestinationStream, type Logger, type LoggerOptions } from "pino";

export type { Logger };

/** Log levels accepted by `createLogger` and the daemons' `--log-level`. */
export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** Extras of `createLogger`. */
export interface LoggerExtras {
  /** A second destination every line also goes to (e.g. the agent's in-memory ring for StreamLogs). */
  tee?: DestinationStream;
  /** Fields added to every line (a pino mixin); the line's own fields win. */
  mixin?: () => object;
}

/**
 * The daemons' logger: one JSON object per line (pino), to stderr unless a destination is given, with
 * the process name on every line.
 */
export function createLogger(
  name: string,
  level: LogLevel = "info",
  destination?: DestinationStream,
  extras: LoggerExtras = {},
): Logger {
  const options: LoggerOptions = {
    name,
    level,
    base: { pid: process.pid },
    ...(extras.mixin ? { mixin: extras.mixin } : {}),
  };
  const out = destination ?? pino.destination({ fd: 2, sync: false });
  if (!extras.tee || level === "silent") return pino(options, out);
  return pino(
    options,
    pino.multistream([
      { stream: out, level },
      { stream: extras.tee, level },
    ]),
  );
}
