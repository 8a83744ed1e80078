import { LOG_LEVELS, type LogLevel } from "@vmenv/rpc";
import { Command, Option } from "commander";

/** The coordinator's settings, after flags and environment are merged. */
export interface CoordinatorConfig {
  /** LevelDB directory. */
  dataDir: string;
  socket: string;
  listen: { host: string; port: number } | undefined;
  logLevel: LogLevel;
  /** How often agents are called for a heartbeat. */
  heartbeatIntervalMs: number;
  /** An agent not reached for this long is DOWN. */
  heartbeatTimeoutMs: number;
  /** How long a placement reservation holds room before the collector releases it. */
  reservationTtlMs: number;
  /** How often the collector runs. */
  collectorIntervalMs: number;
  shutdownGraceMs: number;
}

export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

const int = (flag: string, min: number) => (raw: string) => {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min)
    throw new ConfigError(`${flag} must be an integer ≥ ${min}, got "${raw}"`);
  return n;
};

/** Parses "host:port" ("[::1]:7000", ":7000" = all interfaces); "" or "off" turns TCP off. */
export function parseListen(raw: string): CoordinatorConfig["listen"] {
  if (raw === "" || raw === "off") return undefined;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s]*)):(\d{1,5})$/.exec(raw);
  const port = Number(m?.[3]);
  if (!m || port > 65535) throw new ConfigError(`--listen must be host:port (or "off"), got "${raw}"`);
  return { host: m[1] ?? (m[2] || "0.0.0.0"), port };
}

interface Setting {
  flag: string;
  env: string;
  help: string;
  default: string;
  choices?: readonly string[];
}

const SETTINGS = {
  dataDir: {
    flag: "--data-dir <dir>",
    env: "VMENV_COORDINATOR_DATA_DIR",
    default: "/var/lib/vmenv/coordinator",
    help: "directory of the coordinator's LevelDB store",
  },
  socket: {
    flag: "--socket <path>",
    env: "VMENV_COORDINATOR_SOCKET",
    default: "/run/vmenv/coordinator.sock",
    help: "Unix socket for local clients (the CLI)",
  },
  listen: {
    flag: "--listen <host:port>",
    env: "VMENV_COORDINATOR_LISTEN",
    default: "127.0.0.1:7000",
    help: 'TCP address for remote clients; port 0 picks one; "off" disables TCP',
  },
  logLevel: {
    flag: "--log-level <level>",
    env: "VMENV_COORDINATOR_LOG_LEVEL",
    default: "info",
    choices: LOG_LEVELS,
    help: "least severe log level written",
  },
  heartbeatIntervalMs: {
    flag: "--heartbeat-interval-ms <ms>",
    env: "VMENV_COORDINATOR_HEARTBEAT_INTERVAL_MS",
    default: "1000",
    help: "how often each agent is called for a heartbeat",
  },
  heartbeatTimeoutMs: {
    flag: "--heartbeat-timeout-ms <ms>",
    env: "VMENV_COORDINATOR_HEARTBEAT_TIMEOUT_MS",
    default: "5000",
    help: "an agent not reached for this long is marked DOWN",
  },
  reservationTtlMs: {
    flag: "--reservation-ttl-ms <ms>",
    env: "VMENV_COORDINATOR_RESERVATION_TTL_MS",
    default: "300000",
    help: "how long a placement reservation holds room before the collector releases it",
  },
  collectorIntervalMs: {
    flag: "--collector-interval-ms <ms>",
    env: "VMENV_COORDINATOR_COLLECTOR_INTERVAL_MS",
    default: "10000",
    help: "how often the collector looks for expired reservations and VMs nobody owns",
  },
  shutdownGraceMs: {
    flag: "--shutdown-grace-ms <ms>",
    env: "VMENV_COORDINATOR_SHUTDOWN_GRACE_MS",
    default: "5000",
    help: "how long a stopping coordinator lets calls finish",
  },
} satisfies Record<keyof CoordinatorConfig, Setting>;

/** The command line of vmenv-coordinator (flags fall back to VMENV_COORDINATOR_* variables). */
export function coordinatorCommand(version: string): Command {
  const cmd = new Command("vmenv-coordinator")
    .description("vmenv-coordinator: the fleet's resource tree, placement, environments and operations")
    .version(version)
    .showHelpAfterError();
  for (const s of Object.values(SETTINGS) as Setting[]) {
    const o = new Option(s.flag, s.help).env(s.env).default(s.default);
    if (s.choices) o.choices(s.choices);
    cmd.addOption(o);
  }
  return cmd;
}

/** Settings from a parsed command. */
export function resolveConfig(cmd: Command): CoordinatorConfig {
  const o = cmd.opts<Record<keyof CoordinatorConfig, string>>();
  const cfg: CoordinatorConfig = {
    dataDir: o.dataDir,
    socket: o.socket,
    listen: parseListen(o.listen),
    logLevel: o.logLevel as LogLevel,
    heartbeatIntervalMs: int("--heartbeat-interval-ms", 50)(o.heartbeatIntervalMs),
    heartbeatTimeoutMs: int("--heartbeat-timeout-ms", 100)(o.heartbeatTimeoutMs),
    reservationTtlMs: int("--reservation-ttl-ms", 100)(o.reservationTtlMs),
    collectorIntervalMs: int("--collector-interval-ms", 50)(o.collectorIntervalMs),
    shutdownGraceMs: int("--shutdown-grace-ms", 0)(o.shutdownGraceMs),
  };
  if (cfg.heartbeatTimeoutMs <= cfg.heartbeatIntervalMs)
    throw new ConfigError("--heartbeat-timeout-ms must be longer than --heartbeat-interval-ms");
  return cfg;
}
