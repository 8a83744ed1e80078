import type { Clock } from "../../ports.js";
import type { Store } from "../../store/store.js";
import type { Policy } from "../../tree/domain.js";
import { ResourceTree } from "../../tree/tree.js";

/**
 * The resource tree over `store` with one node, `acme`, where the environment tests put their
 * environments: no limits unless `policy` sets some, every network, host label and CPU allowed.
 */
export async function acmeTree(
  store: Store,
  clock: Clock,
  policy: Partial<Policy> = {},
): Promise<ResourceTree> {
  const tree = new ResourceTree(store, clock);
  await tree.createNode("", "acme", {
    description: "",
    labels: {},
    policy: { ...policy, allowedNetworks: [], allowedHostLabels: {}, allowedCpus: [] },
  });
  return tree;
}
