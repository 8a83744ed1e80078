/**
 * Isolation between networks on hosts that route IPv4: one nftables table per agent (`inet vmenv-<agent
 * tag>`), rewritten as a whole (atomically, `nft -f -` with the ruleset on stdin, no shell) whenever the
 * networks change, re-written at start, and removed when the last network goes. Its forward chain lets
 * replies through, accepts new traffic from a network to the peers it allows, and drops anything else
 * routed between one of this agent's bridges and any `vme-` bridge.
 */
import { execa } from "execa";

/** A network as the filter sees it: its bridge and the bridges of the peers it allows. */
export interface FilteredNetwork {
  bridge: string;
  allowedBridges: string[];
}

/** The nftables table of the agent with this tag. */
export const tableName = (tag: string) => `vmenv-${tag}`;

/**
 * The ruleset for these networks (pure). Bridge names are validated interface names (letters, digits,
 * `_`, `.`, `-`), so quoting them is enough. The leading `add table` + `delete table` makes the whole
 * file one atomic replacement, whether the table existed or not.
 */
export function isolationRuleset(tag: string, nets: FilteredNetwork[]): string {
  const t = tableName(tag);
  const q = (s: string) => `"${s}"`;
  const mine = [...new Set(nets.map((n) => n.bridge))].sort();
  const lines = [`add table inet ${t}`, `delete table inet ${t}`];
  if (mine.length === 0) return `${lines.join("\n")}\n`;
  lines.push(
    `table inet ${t} {`,
    "  set bridges {",
    "    type ifname",
    `    elements = { ${mine.map(q).join(", ")} }`,
    "  }",
    "  chain forward {",
    "    type filter hook forward priority filter; policy accept;",
    "    ct state established,related accept",
  );
  for (const n of [...nets].sort((a, b) => a.bridge.localeCompare(b.bridge))) {
    lines.push(`    iifname ${q(n.bridge)} oifname ${q(n.bridge)} accept`);
    for (const p of [...new Set(n.allowedBridges)].sort())
      lines.push(`    iifname ${q(n.bridge)} oifname ${q(p)} accept`);
  }
  lines.push(
    `    iifname @bridges oifname "vme-*" drop`,
    `    iifname "vme-*" oifname @bridges drop`,
    "  }",
    "}",
  );
  return `${lines.join("\n")}\n`;
}

/** The port the network manager uses (faked in tests without nft). */
export interface NetworkFilter {
  /** Whether the host has nftables; false: isolation rests on the host not forwarding. */
  available(): Promise<boolean>;
  /** Makes the agent's table match `nets` (removing it when there are none). */
  sync(nets: FilteredNetwork[]): Promise<void>;
}

export class NftFilter implements NetworkFilter {
  #available: Promise<boolean> | undefined;
  constructor(
    private readonly tag: string,
    private readonly nft = "nft",
  ) {}

  available(): Promise<boolean> {
    this.#available ??= execa(this.nft, ["--version"], {
      reject: false,
      stdin: "ignore",
      timeout: 10_000,
    }).then(
      (r) => r.exitCode === 0,
      () => false,
    );
    return this.#available;
  }

  async sync(nets: FilteredNetwork[]): Promise<void> {
    if (!(await this.available())) return;
    const r = await execa(this.nft, ["-f", "-"], {
      input: isolationRuleset(this.tag, nets),
      reject: false,
      timeout: 15_000,
    });
    if (r.exitCode !== 0)
      throw new Error(`nft -f - (table inet ${tableName(this.tag)}): ${String(r.stderr || r.stdout).trim()}`);
  }
}
