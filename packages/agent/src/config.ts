import { readFile } from "node:fs/promises";
import { LOG_LEVELS, type LogLevel } from "@vmenv/rpc";
import { Command, Option } from "commander";

/** The agent's settings, after flags, environment and config file are merged. */
export interface AgentConfig {
  socket: string;
  socketMode: number;
  listen: { host: string; port: number } | undefined;
  tlsCert: string | undefined;
  tlsKey: string | undefined;
  tlsClientCa: string | undefined;
  tlsRequireClientCert: boolean;
  stateDir: string;
  accelerator: "auto" | "kvm" | "tcg";
  qemuBinary: string | undefined;
  kvmProbeTimeoutMs: number;
  logLevel: LogLevel;
  guestReadyPattern: string;
  shutdownGraceMs: number;
  /** Where sysfs is mounted: the GPU inventory reads (and assignment writes) PCI devices under it. */
  sysfsRoot: string;
  /** nvidia-smi to ask about NVIDIA GPUs (a name looked up on PATH, or a path); missing is fine. */
  nvidiaSmi: string;
  /** vCPUs offered per logical CPU (HostCapacity.vcpus_allocatable). */
  cpuOvercommit: number;
  /** Logical CPUs kept for the host, not offered to VMs. */
  reservedCpus: number;
  /** Memory kept for the host, not offered to VMs, in MiB. */
  reservedMemoryMib: number;
  /** host:port of the Prometheus endpoint (/metrics); undefined: off. */
  metricsListen: { host: string; port: number } | undefined;
}

/** One setting: its flag, environment variable, config-file key, default and meaning. */
interface Setting<K extends keyof AgentConfig> {
  key: K;
  flag: string;
  env: string;
  help: string;
  default: string | undefined;
  choices?: readonly string[];
  parse: (raw: string) => AgentConfig[K];
}

const int = (what: string, min: number) => (raw: string) => {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min)
    throw new ConfigError(`${what} must be an integer ≥ ${min}, got "${raw}"`);
  return n;
};
const bool = (what: string) => (raw: string) => {
  if (/^(1|true|yes|on)$/i.test(raw)) return true;
  if (/^(0|false|no|off)$/i.test(raw)) return false;
  throw new ConfigError(`${what} must be true or false, got "${raw}"`);
};
const optional = (raw: string) => (raw === "" ? undefined : raw);

export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

/** Parses "host:port" ("[::1]:7070", ":7070" = all interfaces); "" or "off" turns TCP off. */
export function parseListen(raw: string): AgentConfig["listen"] {
  if (raw === "" || raw === "off") return undefined;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s]*)):(\d{1,5})$/.exec(raw);
  const port = Number(m?.[3]);
  if (!m || port > 65535) throw new ConfigError(`--listen must be host:port (or "off"), got "${raw}"`);
  return { host: m[1] ?? (m[2] || "0.0.0.0"), port };
}

const settings = [
  s({
    key: "socket",
    flag: "--socket <path>",
    env: "VMENV_AGENT_SOCKET",
    default: "/run/vmenv/agent.sock",
    help: "Unix socket for local clients (the CLI, grpcurl -unix)",
    parse: (r) => r,
  }),
  s({
    key: "socketMode",
    flag: "--socket-mode <octal>",
    env: "VMENV_AGENT_SOCKET_MODE",
    default: "0660",
    help: "permissions of the Unix socket",
    parse: (r) => {
      if (!/^0?[0-7]{3}$/.test(r)) throw new ConfigError(`--socket-mode must be octal like 0660, got "${r}"`);
      return Number.parseInt(r, 8);
    },
  }),
  s({
    key: "listen",
    flag: "--listen <host:port>",
    env: "VMENV_AGENT_LISTEN",
    default: "127.0.0.1:7070",
    help: 'TCP address for the coordinator and remote clients; port 0 picks one; "off" disables TCP',
    parse: parseListen,
  }),
  s({
    key: "tlsCert",
    flag: "--tls-cert <file>",
    env: "VMENV_AGENT_TLS_CERT",
    default: undefined,
    help: "PEM certificate of the TCP listener; with --tls-key it turns TLS on",
    parse: optional,
  }),
  s({
    key: "tlsKey",
    flag: "--tls-key <file>",
    env: "VMENV_AGENT_TLS_KEY",
    default: undefined,
    help: "PEM private key of the TCP listener",
    parse: optional,
  }),
  s({
    key: "tlsClientCa",
    flag: "--tls-client-ca <file>",
    env: "VMENV_AGENT_TLS_CLIENT_CA",
    default: undefined,
    help: "PEM CA bundle that client certificates are verified against",
    parse: optional,
  }),
  s({
    key: "tlsRequireClientCert",
    flag: "--tls-require-client-cert [bool]",
    env: "VMENV_AGENT_TLS_REQUIRE_CLIENT_CERT",
    default: "false",
    help: "refuse TLS clients without a certificate signed by --tls-client-ca (mutual TLS)",
    parse: bool("--tls-require-client-cert"),
  }),
  s({
    key: "stateDir",
    flag: "--state-dir <dir>",
    env: "VMENV_AGENT_STATE_DIR",
    default: "/var/lib/vmenv/agent",
    help: "directory holding the agent's state (one folder per VM, volume, network)",
    parse: (r) => r,
  }),
  s({
    key: "accelerator",
    flag: "--accelerator <kind>",
    env: "VMENV_AGENT_ACCELERATOR",
    default: "auto",
    choices: ["auto", "kvm", "tcg"],
    help: "how guests run: auto = KVM when a probe proves it works, else TCG",
    parse: (r) => r as AgentConfig["accelerator"],
  }),
  s({
    key: "qemuBinary",
    flag: "--qemu-binary <path>",
    env: "VMENV_AGENT_QEMU_BINARY",
    default: undefined,
    help: "QEMU system emulator to use (default: qemu-system-<arch> on PATH)",
    parse: optional,
  }),
  s({
    key: "kvmProbeTimeoutMs",
    flag: "--kvm-probe-timeout-ms <ms>",
    env: "VMENV_AGENT_KVM_PROBE_TIMEOUT_MS",
    default: "3000",
    help: "how long the KVM probe guest may take before KVM is declared unusable",
    parse: int("--kvm-probe-timeout-ms", 100),
  }),
  s({
    key: "guestReadyPattern",
    flag: "--guest-ready-pattern <regexp>",
    env: "VMENV_AGENT_GUEST_READY_PATTERN",
    default: "VMENV-GUEST-READY",
    help: "a serial console line matching this marks the guest ready (Vm.guest_ready_time)",
    parse: (r) => {
      try {
        new RegExp(r);
      } catch (e) {
        throw new ConfigError(`--guest-ready-pattern is not a regular expression: ${(e as Error).message}`);
      }
      return r;
    },
  }),
  s({
    key: "logLevel",
    flag: "--log-level <level>",
    env: "VMENV_AGENT_LOG_LEVEL",
    default: "info",
    choices: LOG_LEVELS,
    help: "least severe level logged (JSON lines on stderr)",
    parse: (r) => r as LogLevel,
  }),
  s({
    key: "shutdownGraceMs",
    flag: "--shutdown-grace-ms <ms>",
    env: "VMENV_AGENT_SHUTDOWN_GRACE_MS",
    default: "10000",
    help: "on SIGTERM, how long calls in flight may take to finish",
    parse: int("--shutdown-grace-ms", 0),
  }),
  s({
    key: "sysfsRoot",
    flag: "--sysfs-root <dir>",
    env: "VMENV_AGENT_SYSFS_ROOT",
    default: "/sys",
    help: "where sysfs is: PCI devices and IOMMU groups of the GPU inventory (a fixture tree in tests)",
    parse: (r) => r,
  }),
  s({
    key: "nvidiaSmi",
    flag: "--nvidia-smi <path>",
    env: "VMENV_AGENT_NVIDIA_SMI",
    default: "nvidia-smi",
    help: "nvidia-smi for GPU model, memory and MIG mode (looked up on PATH; none is fine)",
    parse: (r) => r,
  }),
  s({
    key: "cpuOvercommit",
    flag: "--cpu-overcommit <ratio>",
    env: "VMENV_AGENT_CPU_OVERCOMMIT",
    default: "16",
    help: "vCPUs offered per logical CPU of the host (placement and VM create refuse beyond it)",
    parse: (r) => {
      const n = Number(r);
      if (!Number.isFinite(n) || n < 0.1 || n > 1000)
        throw new ConfigError(`--cpu-overcommit must be a number between 0.1 and 1000, got "${r}"`);
      return n;
    },
  }),
  s({
    key: "reservedCpus",
    flag: "--reserved-cpus <n>",
    env: "VMENV_AGENT_RESERVED_CPUS",
    default: "0",
    help: "logical CPUs kept for the host, not offered to VMs",
    parse: int("--reserved-cpus", 0),
  }),
  s({
    key: "reservedMemoryMib",
    flag: "--reserved-memory-mib <MiB>",
    env: "VMENV_AGENT_RESERVED_MEMORY_MIB",
    default: "512",
    help: "memory kept for the host, not offered to VMs",
    parse: int("--reserved-memory-mib", 0),
  }),
  s({
    key: "metricsListen",
    flag: "--metrics-listen <host:port>",
    env: "VMENV_AGENT_METRICS_LISTEN",
    default: undefined,
    help: 'HTTP address of the Prometheus endpoint (GET /metrics: host and VM statistics); off unless set; "off" disables it',
    parse: (r) => {
      try {
        return parseListen(r);
      } catch {
        throw new ConfigError(`--metrics-listen must be host:port (or "off"), got "${r}"`);
      }
    },
  }),
];

function s<K extends keyof AgentConfig>(x: Setting<K>): Setting<K> {
  return x;
}

/** The agent's command line: every setting as a flag, with its environment variable in the help. */
export function agentCommand(version: string): Command {
  const cmd = new Command("vmenv-agent")
    .description(
      "vmenv-agent: the per-host daemon that runs VMs, volumes, networks and GPUs behind a gRPC API.\n" +
        "Settings come from flags, then VMENV_AGENT_* variables, then --config, then defaults.",
    )
    .version(version, "--version")
    .option(
      "--config <file>",
      'JSON file of settings, keyed by the names below in camelCase (e.g. {"stateDir": "/srv/vmenv"})',
    )
    .showHelpAfterError()
    .allowExcessArguments(false);
  for (const x of settings) {
    const o = new Option(x.flag, `${x.help} [env ${x.env}]`);
    if (x.default !== undefined) o.default(x.default);
    if (x.choices) o.choices(x.choices);
    cmd.addOption(o);
  }
  return cmd;
}

/**
 * Merges flags, environment and config file into an AgentConfig. Precedence: flag, environment
 * variable, config file, default. Throws ConfigError naming the setting that is wrong.
 */
export async function resolveConfig(
  cmd: Command,
  env: NodeJS.ProcessEnv = process.env,
): Promise<AgentConfig> {
  const opts = cmd.opts<Record<string, string | boolean | undefined>>();
  let file: Record<string, unknown> = {};
  const configPath = (opts.config as string | undefined) ?? env.VMENV_AGENT_CONFIG;
  if (configPath) {
    let text: string;
    try {
      text = await readFile(configPath, "utf8");
    } catch (e) {
      throw new ConfigError(`cannot read config file ${configPath}: ${(e as Error).message}`);
    }
    try {
      file = JSON.parse(text) as Record<string, unknown>;
    } catch (e) {
      throw new ConfigError(`config file ${configPath} is not valid JSON: ${(e as Error).message}`);
    }
    if (typeof file !== "object" || file === null || Array.isArray(file)) {
      throw new ConfigError(`config file ${configPath} must hold a JSON object`);
    }
    const known = new Set<string>(settings.map((x) => x.key));
    for (const k of Object.keys(file)) {
      if (!known.has(k)) throw new ConfigError(`config file ${configPath}: unknown setting "${k}"`);
    }
  }
  const out: Record<string, unknown> = {};
  for (const x of settings) {
    const flag = new Option(x.flag).attributeName(); // the flag's camelCase name is the setting's key
    const fromFlag = cmd.getOptionValueSource(flag) === "cli" ? opts[flag] : undefined;
    const fileValue = file[x.key];
    const raw =
      fromFlag !== undefined
        ? String(fromFlag === true ? "true" : fromFlag)
        : env[x.env] !== undefined
          ? env[x.env]
          : fileValue !== undefined
            ? String(fileValue)
            : x.default;
    if (raw !== undefined && x.choices && !x.choices.includes(raw)) {
      throw new ConfigError(`${x.flag.split(" ")[0]} must be one of ${x.choices.join(", ")}, got "${raw}"`);
    }
    out[x.key] = raw === undefined ? undefined : x.parse(raw);
  }
  const c = out as unknown as AgentConfig;
  if ((c.tlsCert === undefined) !== (c.tlsKey === undefined)) {
    throw new ConfigError("--tls-cert and --tls-key go together");
  }
  if ((c.tlsClientCa !== undefined || c.tlsRequireClientCert) && c.tlsCert === undefined) {
    throw new ConfigError(
      "--tls-client-ca and --tls-require-client-cert need TLS (--tls-cert and --tls-key)",
    );
  }
  if (c.tlsRequireClientCert && c.tlsClientCa === undefined) {
    throw new ConfigError("--tls-require-client-cert needs --tls-client-ca to verify client certificates");
  }
  return c;
}
