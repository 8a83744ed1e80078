import pino, { type DestinationStream, type Logger, type LoggerOptions } from "pino";

export type { Logger };

/** Log levels accepted by `createLogger` and the daemons' `--log-level`. */
export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/**
 * The daemons' logger: one JSON object per line (pino), to stderr unless a destination is given, with
 * the process name on every line.
 */
export function createLogger(
  name: string,
  level: LogLevel = "info",
  destination?: DestinationStream,
): Logger {
  const options: LoggerOptions = { name, level, base: { pid: process.pid } };
  return pino(options, destination ?? pino.destination({ fd: 2, sync: false }));
}
