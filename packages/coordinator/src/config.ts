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
  /** How often the rebalancer runs a pass; 0: never (RebalanceFleet still does). */
  rebalanceIntervalMs: number;
  /** Load (fraction of allocatable vCPUs or memory) above which an agent is overloaded: 0 < x ≤ 1. */
  rebalanceWatermark: number;
  /** How long after a rebalance migration ended its environment is not moved by the rebalancer again. */
  rebalanceCooldownMs: number;
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

/** A fraction 0 < x ≤ 1 (the rebalancer's watermark). */
function fraction(flag: string, raw: string): number {
  const n = Number(raw);
  if (raw.trim() === "" || !(n > 0 && n <= 1))
    throw new ConfigError(
      `${flag} must be a fraction greater than 0 and at most 1 (e.g. 0.85), got "${raw}"`,
    );
  return n;
}

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
  rebalanceIntervalMs: {
    flag: "--rebalance-interval-ms <ms>",
    env: "VMENV_COORDINATOR_REBALANCE_INTERVAL_MS",
    default: "30000",
    help: "how often the rebalancer moves one member off the most loaded agent above the watermark; 0 turns it off",
  },
  rebalanceWatermark: {
    flag: "--rebalance-watermark <fraction>",
    env: "VMENV_COORDINATOR_REBALANCE_WATERMARK",
    default: "0.85",
    help: "an agent whose allocated vCPUs or memory exceed this fraction of its allocatable capacity is overloaded (0 < x <= 1)",
  },
  rebalanceCooldownMs: {
    flag: "--rebalance-cooldown-ms <ms>",
    env: "VMENV_COORDINATOR_REBALANCE_COOLDOWN_MS",
    default: "300000",
    help: "an environment the rebalancer moved is not moved by it again for this long after the migration ended",
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
    rebalanceIntervalMs: int("--rebalance-interval-ms", 0)(o.rebalanceIntervalMs),
    rebalanceWatermark: fraction("--rebalance-watermark", o.rebalanceWatermark),
    rebalanceCooldownMs: int("--rebalance-cooldown-ms", 0)(o.rebalanceCooldownMs),
    shutdownGraceMs: int("--shutdown-grace-ms", 0)(o.shutdownGraceMs),
  };
  if (cfg.rebalanceIntervalMs > 0 && cfg.rebalanceIntervalMs < 100)
    throw new ConfigError(
      `--rebalance-interval-ms must be 0 (off) or at least 100, got "${o.rebalanceIntervalMs}"`,
    );
  if (cfg.heartbeatTimeoutMs <= cfg.heartbeatIntervalMs)
    throw new ConfigError("--heartbeat-timeout-ms must be longer than --heartbeat-interval-ms");
  return cfg;
}
