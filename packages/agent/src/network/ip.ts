/**
 * The host adapter of networking: links, addresses and bridge ports through iproute2 (`ip`, `bridge`),
 * run with argument arrays (never a shell). Every call that changes something is safe to repeat where
 * the kernel allows it; callers measure first.
 */
import { readFile } from "node:fs/promises";
import { execa } from "execa";

/** What `ip -j -d link show` says of a link, the parts we read. */
export interface LinkInfo {
  ifname: string;
  /** The alias (`ip link set … alias`): where the agent writes whose link it is. */
  ifalias?: string;
  master?: string;
  mtu: number;
  flags: string[];
  address?: string;
  /** `bridge`, `tun`, `veth`, … */
  kind?: string;
  /** For `tun` links: `tap` or `tun`. */
  tunType?: string;
  /** For bridge ports: whether the port is isolated. */
  isolated?: boolean;
}

/** An IPv4 address of a host interface. */
export interface HostAddress {
  ifname: string;
  local: string;
  prefixlen: number;
}

interface RawLink {
  ifname: string;
  ifalias?: string;
  master?: string;
  mtu: number;
  flags?: string[];
  address?: string;
  linkinfo?: {
    info_kind?: string;
    info_data?: { type?: string };
    info_slave_data?: { isolated?: boolean };
  };
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

const toLink = (r: RawLink): LinkInfo => ({
  ifname: r.ifname,
  ...(r.ifalias !== undefined ? { ifalias: r.ifalias } : {}),
  ...(r.master !== undefined ? { master: r.master } : {}),
  mtu: r.mtu,
  flags: r.flags ?? [],
  ...(r.address !== undefined ? { address: r.address } : {}),
  ...(r.linkinfo?.info_kind !== undefined ? { kind: r.linkinfo.info_kind } : {}),
  ...(r.linkinfo?.info_data?.type !== undefined ? { tunType: r.linkinfo.info_data.type } : {}),
  ...(r.linkinfo?.info_slave_data?.isolated !== undefined
    ? { isolated: r.linkinfo.info_slave_data.isolated }
    : {}),
});

/** The operations on the host that the network manager needs (a port, so that tests may fake it). */
export interface LinkHost {
  links(): Promise<LinkInfo[]>;
  link(name: string): Promise<LinkInfo | undefined>;
  addBridge(name: string): Promise<void>;
  addTap(name: string): Promise<void>;
  setAlias(name: string, alias: string): Promise<void>;
  setMtu(name: string, mtu: number): Promise<void>;
  setMaster(name: string, master: string): Promise<void>;
  /** Takes a link out of its bridge (`nomaster`). */
  setNoMaster(name: string): Promise<void>;
  setUp(name: string): Promise<void>;
  setIsolated(name: string, on: boolean): Promise<void>;
  /** Removes a link; one that is gone already is a no-op. */
  remove(name: string): Promise<void>;
  /** IPv4 addresses of one link (or of every link). */
  addresses(name?: string): Promise<HostAddress[]>;
  addAddress(name: string, address: string, prefix: number): Promise<void>;
  /** Whether the host routes IPv4 between interfaces (net.ipv4.ip_forward). */
  forwarding(): Promise<boolean>;
}

const GONE = /does not exist|Cannot find device/;

export class IpLinkHost implements LinkHost {
  constructor(
    private readonly ip = "ip",
    private readonly bridge = "bridge",
  ) {}

  async #run(bin: string, args: string[]): Promise<string> {
    const r = await execa(bin, args, { reject: false, stdin: "ignore", timeout: 15_000 });
    if (r.exitCode !== 0) {
      const msg = (r.stderr || r.stdout || `exit ${r.exitCode}`).toString().trim();
      throw Object.assign(new Error(`${bin} ${args.join(" ")}: ${msg}`), { stderr: msg });
    }
    return r.stdout.toString();
  }

  async links(): Promise<LinkInfo[]> {
    return (JSON.parse(await this.#run(this.ip, ["-j", "-d", "link", "show"])) as RawLink[]).map(toLink);
  }

  async link(name: string): Promise<LinkInfo | undefined> {
    try {
      const out = JSON.parse(
        await this.#run(this.ip, ["-j", "-d", "link", "show", "dev", name]),
      ) as RawLink[];
      return out[0] ? toLink(out[0]) : undefined;
    } catch (e) {
      if (GONE.test((e as { stderr?: string }).stderr ?? "")) return undefined;
      throw e;
    }
  }

  async addBridge(name: string): Promise<void> {
    await this.#run(this.ip, ["link", "add", "name", name, "type", "bridge"]);
  }

  async addTap(name: string): Promise<void> {
    await this.#run(this.ip, ["tuntap", "add", "dev", name, "mode", "tap"]);
  }

  async setAlias(name: string, alias: string): Promise<void> {
    await this.#run(this.ip, ["link", "set", "dev", name, "alias", alias]);
  }

  async setMtu(name: string, mtu: number): Promise<void> {
    await this.#run(this.ip, ["link", "set", "dev", name, "mtu", String(mtu)]);
  }

  async setMaster(name: string, master: string): Promise<void> {
    await this.#run(this.ip, ["link", "set", "dev", name, "master", master]);
  }

  async setNoMaster(name: string): Promise<void> {
    await this.#run(this.ip, ["link", "set", "dev", name, "nomaster"]);
  }

  async setUp(name: string): Promise<void> {
    await this.#run(this.ip, ["link", "set", "dev", name, "up"]);
  }

  async setIsolated(name: string, on: boolean): Promise<void> {
    await this.#run(this.bridge, ["link", "set", "dev", name, "isolated", on ? "on" : "off"]);
  }

  async remove(name: string): Promise<void> {
    try {
      await this.#run(this.ip, ["link", "del", "dev", name]);
    } catch (e) {
      if (!GONE.test((e as { stderr?: string }).stderr ?? "")) throw e;
    }
  }

  async addresses(name?: string): Promise<HostAddress[]> {
    const args = ["-j", "-4", "addr", "show", ...(name ? ["dev", name] : [])];
    const out = JSON.parse(await this.#run(this.ip, args)) as RawLink[];
    return out.flatMap((l) =>
      (l.addr_info ?? [])
        .filter((a) => a.family === "inet")
        .map((a) => ({ ifname: l.ifname, local: a.local, prefixlen: a.prefixlen })),
    );
  }

  async addAddress(name: string, address: string, prefix: number): Promise<void> {
    await this.#run(this.ip, ["addr", "add", `${address}/${prefix}`, "dev", name]);
  }

  async forwarding(): Promise<boolean> {
    const v = await readFile("/proc/sys/net/ipv4/ip_forward", "utf8").catch(() => "1");
    return v.trim() !== "0";
  }
}
