import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CommanderError } from "commander";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type AgentConfig, agentCommand, ConfigError, parseListen, resolveConfig } from "./config.js";

/** Parses `args` as `vmenv-agent ...args` would; commander's errors throw instead of exiting. */
function parse(args: string[]) {
  const out = { stdout: "", stderr: "" };
  const cmd = agentCommand("9.8.7")
    .exitOverride()
    .configureOutput({ writeOut: (s) => (out.stdout += s), writeErr: (s) => (out.stderr += s) });
  cmd.parse(["node", "vmenv-agent", ...args], { from: "node" });
  return { cmd, out };
}

/** The settings for `args` and `env` (never the test runner's own environment). */
const resolve = (args: string[], env: NodeJS.ProcessEnv = {}) => resolveConfig(parse(args).cmd, env);

/** The ConfigError message `p` rejects with. */
async function configError(p: Promise<unknown>): Promise<string> {
  const e = await p.then(
    () => expect.unreachable("the settings were accepted"),
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(ConfigError);
  return (e as ConfigError).message;
}

/** The commander error (usage error) that parsing `args` throws, with what it printed. */
function usageError(args: string[]): { error: CommanderError; stderr: string } {
  const out = { stdout: "", stderr: "" };
  const cmd = agentCommand("9.8.7")
    .exitOverride()
    .configureOutput({ writeOut: (s) => (out.stdout += s), writeErr: (s) => (out.stderr += s) });
  try {
    cmd.parse(["node", "vmenv-agent", ...args], { from: "node" });
  } catch (e) {
    expect(e).toBeInstanceOf(CommanderError);
    return { error: e as CommanderError, stderr: out.stderr };
  }
  return expect.unreachable("the command line was accepted");
}

const defaults: AgentConfig = {
  socket: "/run/vmenv/agent.sock",
  socketMode: 0o660,
  listen: { host: "127.0.0.1", port: 7070 },
  tlsCert: undefined,
  tlsKey: undefined,
  tlsClientCa: undefined,
  tlsRequireClientCert: false,
  stateDir: "/var/lib/vmenv/agent",
  accelerator: "auto",
  qemuBinary: undefined,
  kvmProbeTimeoutMs: 3000,
  logLevel: "info",
  guestReadyPattern: "VMENV-GUEST-READY",
  shutdownGraceMs: 10_000,
  sysfsRoot: "/sys",
  nvidiaSmi: "nvidia-smi",
  cpuOvercommit: 16,
  reservedCpus: 0,
  reservedMemoryMib: 512,
};

/** A configuration where every setting differs from its default. */
const everything: AgentConfig = {
  socket: "/srv/vmenv/a.sock",
  socketMode: 0o600,
  listen: { host: "::1", port: 7443 },
  tlsCert: "/etc/vmenv/cert.pem",
  tlsKey: "/etc/vmenv/key.pem",
  tlsClientCa: "/etc/vmenv/ca.pem",
  tlsRequireClientCert: true,
  stateDir: "/srv/vmenv/state",
  accelerator: "kvm",
  qemuBinary: "/opt/qemu/bin/qemu-system-x86_64",
  kvmProbeTimeoutMs: 5000,
  logLevel: "debug",
  guestReadyPattern: "^login:",
  shutdownGraceMs: 2500,
  sysfsRoot: "/srv/sys",
  nvidiaSmi: "/opt/nvidia/bin/nvidia-smi",
  cpuOvercommit: 4.5,
  reservedCpus: 2,
  reservedMemoryMib: 2048,
};

describe("resolveConfig", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-config-"));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function configFile(content: unknown, name = "agent.json"): Promise<string> {
    const path = join(dir, name);
    await writeFile(path, typeof content === "string" ? content : JSON.stringify(content));
    return path;
  }

  it("gives the documented defaults with no flags, environment or file", async () => {
    expect(await resolve([])).toEqual(defaults);
  });

  it("takes every setting from its flag", async () => {
    const c = await resolve([
      "--socket",
      "/srv/vmenv/a.sock",
      "--socket-mode",
      "0600",
      "--listen",
      "[::1]:7443",
      "--tls-cert",
      "/etc/vmenv/cert.pem",
      "--tls-key",
      "/etc/vmenv/key.pem",
      "--tls-client-ca",
      "/etc/vmenv/ca.pem",
      "--tls-require-client-cert",
      "--state-dir",
      "/srv/vmenv/state",
      "--accelerator",
      "kvm",
      "--qemu-binary",
      "/opt/qemu/bin/qemu-system-x86_64",
      "--kvm-probe-timeout-ms",
      "5000",
      "--log-level",
      "debug",
      "--guest-ready-pattern",
      "^login:",
      "--shutdown-grace-ms",
      "2500",
      "--sysfs-root",
      "/srv/sys",
      "--nvidia-smi",
      "/opt/nvidia/bin/nvidia-smi",
      "--cpu-overcommit",
      "4.5",
      "--reserved-cpus",
      "2",
      "--reserved-memory-mib",
      "2048",
    ]);
    expect(c).toEqual(everything);
  });

  it("takes every setting from its VMENV_AGENT_* variable", async () => {
    const c = await resolve([], {
      VMENV_AGENT_SOCKET: "/srv/vmenv/a.sock",
      VMENV_AGENT_SOCKET_MODE: "0600",
      VMENV_AGENT_LISTEN: "[::1]:7443",
      VMENV_AGENT_TLS_CERT: "/etc/vmenv/cert.pem",
      VMENV_AGENT_TLS_KEY: "/etc/vmenv/key.pem",
      VMENV_AGENT_TLS_CLIENT_CA: "/etc/vmenv/ca.pem",
      VMENV_AGENT_TLS_REQUIRE_CLIENT_CERT: "yes",
      VMENV_AGENT_STATE_DIR: "/srv/vmenv/state",
      VMENV_AGENT_ACCELERATOR: "kvm",
      VMENV_AGENT_QEMU_BINARY: "/opt/qemu/bin/qemu-system-x86_64",
      VMENV_AGENT_KVM_PROBE_TIMEOUT_MS: "5000",
      VMENV_AGENT_LOG_LEVEL: "debug",
      VMENV_AGENT_GUEST_READY_PATTERN: "^login:",
      VMENV_AGENT_SHUTDOWN_GRACE_MS: "2500",
      VMENV_AGENT_SYSFS_ROOT: "/srv/sys",
      VMENV_AGENT_NVIDIA_SMI: "/opt/nvidia/bin/nvidia-smi",
      VMENV_AGENT_CPU_OVERCOMMIT: "4.5",
      VMENV_AGENT_RESERVED_CPUS: "2",
      VMENV_AGENT_RESERVED_MEMORY_MIB: "2048",
    });
    expect(c).toEqual(everything);
  });

  it("takes every setting from the config file, JSON types included", async () => {
    const path = await configFile({
      socket: "/srv/vmenv/a.sock",
      socketMode: "0600",
      listen: "[::1]:7443",
      tlsCert: "/etc/vmenv/cert.pem",
      tlsKey: "/etc/vmenv/key.pem",
      tlsClientCa: "/etc/vmenv/ca.pem",
      tlsRequireClientCert: true,
      stateDir: "/srv/vmenv/state",
      accelerator: "kvm",
      qemuBinary: "/opt/qemu/bin/qemu-system-x86_64",
      kvmProbeTimeoutMs: 5000,
      logLevel: "debug",
      guestReadyPattern: "^login:",
      shutdownGraceMs: 2500,
      sysfsRoot: "/srv/sys",
      nvidiaSmi: "/opt/nvidia/bin/nvidia-smi",
      cpuOvercommit: 4.5,
      reservedCpus: 2,
      reservedMemoryMib: 2048,
    });
    expect(await resolve(["--config", path])).toEqual(everything);
  });

  it("ranks flag over environment over config file over default", async () => {
    const path = await configFile({ logLevel: "error" });
    const env = { VMENV_AGENT_LOG_LEVEL: "warn" };
    expect((await resolve(["--config", path, "--log-level", "debug"], env)).logLevel).toBe("debug");
    expect((await resolve(["--config", path], env)).logLevel).toBe("warn");
    expect((await resolve(["--config", path])).logLevel).toBe("error");
    expect((await resolve([])).logLevel).toBe("info");
  });

  it("ranks them the same for a setting whose flag value equals its default", async () => {
    // "--listen 127.0.0.1:7070" is the default value, but given on the command line it still wins.
    const path = await configFile({ listen: "off" });
    const env = { VMENV_AGENT_LISTEN: ":9000" };
    expect((await resolve(["--config", path, "--listen", "127.0.0.1:7070"], env)).listen).toEqual({
      host: "127.0.0.1",
      port: 7070,
    });
    expect((await resolve(["--config", path], env)).listen).toEqual({ host: "0.0.0.0", port: 9000 });
    expect((await resolve(["--config", path])).listen).toBeUndefined();
  });

  it("finds the config file through VMENV_AGENT_CONFIG, and --config wins over it", async () => {
    const fromEnv = await configFile({ stateDir: "/from/env" }, "env.json");
    const fromFlag = await configFile({ stateDir: "/from/flag" }, "flag.json");
    expect((await resolve([], { VMENV_AGENT_CONFIG: fromEnv })).stateDir).toBe("/from/env");
    expect((await resolve(["--config", fromFlag], { VMENV_AGENT_CONFIG: fromEnv })).stateDir).toBe(
      "/from/flag",
    );
  });

  it("lets an empty variable clear an optional setting the file sets", async () => {
    const path = await configFile({ qemuBinary: "/opt/qemu" });
    expect((await resolve(["--config", path], { VMENV_AGENT_QEMU_BINARY: "" })).qemuBinary).toBeUndefined();
  });

  describe("--listen", () => {
    it.each([
      ["127.0.0.1:7070", { host: "127.0.0.1", port: 7070 }],
      ["[::1]:7070", { host: "::1", port: 7070 }],
      ["[::]:7070", { host: "::", port: 7070 }],
      [":7070", { host: "0.0.0.0", port: 7070 }],
      ["agent.example.com:65535", { host: "agent.example.com", port: 65535 }],
      ["127.0.0.1:0", { host: "127.0.0.1", port: 0 }],
      ["off", undefined],
      ["", undefined],
    ])("%j → %j", async (raw, want) => {
      expect(parseListen(raw)).toEqual(want);
      expect((await resolve(["--listen", raw])).listen).toEqual(want);
    });

    it.each([
      "7070",
      "127.0.0.1",
      "127.0.0.1:",
      "::1:7070",
      "[::1]",
      "127.0.0.1:65536",
      "127.0.0.1:123456",
      "127.0.0.1:http",
      "my host:7070",
      "on",
    ])("refuses %j naming the flag and the value", async (raw) => {
      const want = `--listen must be host:port (or "off"), got "${raw}"`;
      expect(() => parseListen(raw)).toThrow(ConfigError);
      expect(() => parseListen(raw)).toThrow(want);
      expect(await configError(resolve(["--listen", raw]))).toBe(want);
    });
  });

  describe("--socket-mode", () => {
    it.each([
      ["0600", 0o600],
      ["600", 0o600],
      ["0660", 0o660],
      ["0777", 0o777],
    ])("accepts %s", async (raw, want) => {
      expect((await resolve(["--socket-mode", raw])).socketMode).toBe(want);
    });

    it.each(["0999", "66", "01777", "rw-rw----", "0x1b6", "438"])("refuses %j", async (raw) => {
      expect(await configError(resolve(["--socket-mode", raw]))).toBe(
        `--socket-mode must be octal like 0660, got "${raw}"`,
      );
    });
  });

  describe("numbers and booleans", () => {
    it("accepts the least values allowed", async () => {
      const c = await resolve(["--kvm-probe-timeout-ms", "100", "--shutdown-grace-ms", "0"]);
      expect(c.kvmProbeTimeoutMs).toBe(100);
      expect(c.shutdownGraceMs).toBe(0);
    });

    it.each([
      [["--kvm-probe-timeout-ms", "99"], '--kvm-probe-timeout-ms must be an integer ≥ 100, got "99"'],
      [["--kvm-probe-timeout-ms", "3s"], '--kvm-probe-timeout-ms must be an integer ≥ 100, got "3s"'],
      [["--shutdown-grace-ms", "-1"], '--shutdown-grace-ms must be an integer ≥ 0, got "-1"'],
      [["--shutdown-grace-ms", "1.5"], '--shutdown-grace-ms must be an integer ≥ 0, got "1.5"'],
    ])("refuses %j", async (args, want) => {
      expect(await configError(resolve(args))).toBe(want);
    });

    it("refuses a malformed value from the environment with the flag's name", async () => {
      expect(await configError(resolve([], { VMENV_AGENT_SHUTDOWN_GRACE_MS: "soon" }))).toBe(
        '--shutdown-grace-ms must be an integer ≥ 0, got "soon"',
      );
      expect(await configError(resolve([], { VMENV_AGENT_TLS_REQUIRE_CLIENT_CERT: "maybe" }))).toBe(
        '--tls-require-client-cert must be true or false, got "maybe"',
      );
    });
  });

  describe("TLS", () => {
    const tls = ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"];

    it("turns on with a certificate and its key", async () => {
      expect(await resolve(tls)).toMatchObject({
        tlsCert: "/c.pem",
        tlsKey: "/k.pem",
        tlsClientCa: undefined,
        tlsRequireClientCert: false,
      });
    });

    it("refuses a certificate without its key, and a key without its certificate", async () => {
      expect(await configError(resolve(["--tls-cert", "/c.pem"]))).toBe(
        "--tls-cert and --tls-key go together",
      );
      expect(await configError(resolve([], { VMENV_AGENT_TLS_KEY: "/k.pem" }))).toBe(
        "--tls-cert and --tls-key go together",
      );
    });

    it("refuses client-certificate settings without TLS", async () => {
      const want = "--tls-client-ca and --tls-require-client-cert need TLS (--tls-cert and --tls-key)";
      expect(await configError(resolve(["--tls-client-ca", "/ca.pem"]))).toBe(want);
      expect(await configError(resolve(["--tls-require-client-cert"]))).toBe(want);
    });

    it("refuses --tls-require-client-cert without --tls-client-ca", async () => {
      expect(await configError(resolve([...tls, "--tls-require-client-cert"]))).toBe(
        "--tls-require-client-cert needs --tls-client-ca to verify client certificates",
      );
    });

    it("takes --tls-require-client-cert with or without a value", async () => {
      const mtls = [...tls, "--tls-client-ca", "/ca.pem"];
      expect((await resolve([...mtls, "--tls-require-client-cert"])).tlsRequireClientCert).toBe(true);
      expect((await resolve([...mtls, "--tls-require-client-cert", "true"])).tlsRequireClientCert).toBe(true);
      expect((await resolve([...mtls, "--tls-require-client-cert", "false"])).tlsRequireClientCert).toBe(
        false,
      );
      // A client CA alone verifies the certificates clients choose to present.
      expect((await resolve(mtls)).tlsRequireClientCert).toBe(false);
    });
  });

  describe("config file errors", () => {
    it("names a file that cannot be read", async () => {
      const path = join(dir, "missing.json");
      const msg = await configError(resolve(["--config", path]));
      expect(msg).toMatch(new RegExp(`^cannot read config file ${path}: ENOENT`));
    });

    it("names a file that is not JSON", async () => {
      const path = await configFile('{"logLevel": "debug",}');
      expect(await configError(resolve(["--config", path]))).toMatch(
        new RegExp(`^config file ${path} is not valid JSON: `),
      );
    });

    it.each(["[]", "null", '"debug"', "42"])("refuses %s: it is not an object", async (text) => {
      const path = await configFile(text);
      expect(await configError(resolve(["--config", path]))).toBe(
        `config file ${path} must hold a JSON object`,
      );
    });

    it("names an unknown setting", async () => {
      const path = await configFile({ logLevel: "debug", stateDirectory: "/srv" });
      expect(await configError(resolve(["--config", path]))).toBe(
        `config file ${path}: unknown setting "stateDirectory"`,
      );
    });

    it("checks file values as strictly as flags", async () => {
      const path = await configFile({ listen: 7070 });
      expect(await configError(resolve(["--config", path]))).toBe(
        '--listen must be host:port (or "off"), got "7070"',
      );
    });
  });

  describe("--accelerator", () => {
    it.each(["auto", "kvm", "tcg"])("accepts %s", async (kind) => {
      expect((await resolve(["--accelerator", kind])).accelerator).toBe(kind);
      expect((await resolve([], { VMENV_AGENT_ACCELERATOR: kind })).accelerator).toBe(kind);
    });

    it("refuses another kind on the command line as a usage error listing the choices", () => {
      const { error, stderr } = usageError(["--accelerator", "hvf"]);
      expect(error.code).toBe("commander.invalidArgument");
      expect(error.exitCode).not.toBe(0);
      expect(stderr).toContain("argument 'hvf' is invalid. Allowed choices are auto, kvm, tcg.");
    });

    it("refuses another kind from the environment or the file, listing the choices", async () => {
      const want = '--accelerator must be one of auto, kvm, tcg, got "hvf"';
      expect(await configError(resolve([], { VMENV_AGENT_ACCELERATOR: "hvf" }))).toBe(want);
      const path = await configFile({ accelerator: "hvf" });
      expect(await configError(resolve(["--config", path]))).toBe(want);
    });
  });

  describe("--log-level", () => {
    it("refuses an unknown level from the environment, listing the levels", async () => {
      expect(await configError(resolve([], { VMENV_AGENT_LOG_LEVEL: "verbose" }))).toBe(
        '--log-level must be one of trace, debug, info, warn, error, fatal, silent, got "verbose"',
      );
    });

    it("refuses an unknown level on the command line as a usage error", () => {
      const { error, stderr } = usageError(["--log-level", "verbose"]);
      expect(error.code).toBe("commander.invalidArgument");
      expect(stderr).toContain("Allowed choices are trace, debug, info, warn, error, fatal, silent.");
    });
  });
});

describe("agentCommand", () => {
  it("prints its version with --version", () => {
    const { error } = usageError(["--version"]);
    expect(error.code).toBe("commander.version");
    expect(error.exitCode).toBe(0);
    expect(error.message).toBe("9.8.7");
  });

  it("refuses positional arguments", () => {
    const { error, stderr } = usageError(["start"]);
    expect(error.code).toBe("commander.excessArguments");
    expect(stderr).toContain("too many arguments");
  });

  it("refuses an unknown flag", () => {
    const { error, stderr } = usageError(["--listen-on", "1.2.3.4:5"]);
    expect(error.code).toBe("commander.unknownOption");
    expect(stderr).toContain("unknown option '--listen-on'");
  });

  it("names each setting's environment variable in --help", () => {
    const { cmd } = parse([]);
    const help = cmd.helpInformation().replace(/\s+/g, " ");
    for (const v of ["VMENV_AGENT_SOCKET", "VMENV_AGENT_LISTEN", "VMENV_AGENT_KVM_PROBE_TIMEOUT_MS"]) {
      expect(help).toContain(`[env ${v}]`);
    }
  });
});
