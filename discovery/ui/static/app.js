// The discovery dashboard: keeps the server-rendered page live through the public API.
// Values from the registry only ever reach the page as text (textContent, text nodes,
// attribute values): never as markup.
"use strict";

(() => {
  const body = document.body;
  const live = document.getElementById("live");
  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token");
  const TOKEN_KEY = "discovery.token";
  const WAIT = "30s";
  const PAGE = 5000; // entries per listing page: the most the API hands out at once
  let tokenWaiters = [];
  let clockSkew = 0; // server clock minus this browser's, from the Date header

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function setLive(text, error = false) {
    if (live.textContent !== text) live.textContent = text;
    live.classList.toggle("error", error);
  }

  // what came of something the user did (the live line above says how the page keeps up)
  const message = document.getElementById("message");
  function say(text, error = false) {
    message.textContent = text;
    message.classList.toggle("error", error);
  }

  // --- building nodes: text only -------------------------------------------------
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === false || value === null || value === undefined) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  // a registry value, isolated so right-to-left text cannot reorder its surroundings
  const bdi = (text) => el("bdi", null, String(text));
  const tagList = (tags) =>
    tags && tags.length ? el("ul", { class: "tags" }, tags.map((t) => el("li", null, bdi(t)))) : null;
  const servicePath = (ns, svc) =>
    "/ui/services/" + encodeURIComponent(ns) + "/" + encodeURIComponent(svc);
  const apiPath = (ns, svc) =>
    "/v1/services/" + encodeURIComponent(ns) + "/" + encodeURIComponent(svc);

  // Keep the children of `parent` in the order of `items`, rebuilding only those whose
  // signature changed (focus and unchanged rows stay put). Returns the keys that are new.
  function reconcile(parent, state, items, keyOf, signatureOf, build) {
    const wanted = new Set();
    const added = [];
    let position = 0;
    for (const item of items) {
      const key = keyOf(item);
      const signature = signatureOf(item);
      wanted.add(key);
      let entry = state.get(key);
      if (!entry || entry.signature !== signature) {
        const node = build(item, !entry);
        if (entry) entry.node.replaceWith(node);
        else added.push(key);
        entry = { node, signature };
        state.set(key, entry);
      }
      if (parent.children[position] !== entry.node) {
        parent.insertBefore(entry.node, parent.children[position] || null);
      }
      position += 1;
    }
    for (const [key, entry] of state) {
      if (!wanted.has(key)) {
        entry.node.remove();
        state.delete(key);
      }
    }
    return added;
  }

  function adoptRows(parent, keyOf) {
    const state = new Map();
    for (const node of parent.children) {
      const key = keyOf(node);
      if (key) state.set(key, { node, signature: null });
    }
    return state;
  }

  // --- the API, with the tab's token --------------------------------------------------
  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (error) {
      return "";
    }
  }

  async function api(path, init = {}) {
    const headers = { Accept: "application/json" };
    const current = token();
    if (current) headers.Authorization = "Bearer " + current;
    const response = await fetch(path, { ...init, headers, cache: "no-store" });
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) clockSkew = date - Date.now();
    return response;
  }

  function showToken() {
    tokenInput.placeholder = token() ? "a token is in use" : "";
  }

  function tokenChanged() {
    showToken();
    const waiters = tokenWaiters;
    tokenWaiters = [];
    for (const resume of waiters) resume();
    document.dispatchEvent(new Event("discovery:token"));
  }

  async function refused(response) {
    const needed = response.status === 401;
    setLive(
      needed
        ? "This server needs an API token: enter it above."
        : "This token may not read this: ask for one with the read right.",
      true,
    );
    await new Promise((resolve) => tokenWaiters.push(resolve));
    setLive("Trying the new token…");
  }

  function retryAfter(response, fallback) {
    const seconds = Number(response.headers.get("Retry-After"));
    return seconds > 0 ? seconds * 1000 : fallback;
  }

  // GET `path` until it answers 200, waiting out refusals, outages and limits.
  async function fetchJson(path) {
    let backoff = 500;
    for (;;) {
      let response;
      try {
        response = await api(path);
      } catch (error) {
        setLive("The server does not answer; retrying…", true);
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 10000);
        continue;
      }
      if (response.status === 401 || response.status === 403) {
        await refused(response);
        continue;
      }
      if (!response.ok) {
        setLive(`The server answered ${response.status}; retrying…`, true);
        await sleep(retryAfter(response, backoff));
        backoff = Math.min(backoff * 2, 10000);
        continue;
      }
      const notice = document.getElementById("token-needed");
      if (notice) notice.hidden = true;
      return { data: await response.json(), index: Number(response.headers.get("X-Discovery-Index")) };
    }
  }

  // A listing a page at a time: the rest of `answer`'s pages (each names the `next`),
  // appended to its `list` (one change between pages is put right by the next long poll).
  async function rest(path, answer, list) {
    let next = answer.data.next;
    while (next) {
      const page = await fetchJson(`${path}?limit=${PAGE}&after=${encodeURIComponent(next)}`);
      answer.data[list] = answer.data[list].concat(page.data[list]);
      next = page.data.next;
    }
    return answer;
  }

  // One long poll per page: `path` answers when the registry moved past `index`; with
  // `list`, every page of that listing is read before `render` sees it.
  async function follow(path, index, render, list = null) {
    setLive("Live: following changes as they happen.");
    for (;;) {
      const query = list ? `limit=${PAGE}` : "";
      const wait = index > 0 ? `index=${index}&wait=${WAIT}` : "";
      const parts = [path.includes("?") ? path.split("?")[1] : "", query, wait].filter(Boolean);
      const url = path.split("?")[0] + (parts.length ? "?" + parts.join("&") : "");
      let answer = await fetchJson(url);
      if (list) answer = await rest(path, answer, list);
      await render(answer.data);
      if (answer.index > 0) index = answer.index;
      setLive("Live: following changes as they happen.");
    }
  }

  // --- the token form -------------------------------------------------------------------
  tokenForm.hidden = false;
  showToken();
  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = tokenInput.value.trim();
    tokenInput.value = "";
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
    } catch (error) {
      say("This browser keeps no session storage: the token cannot be kept.", true);
    }
    tokenChanged();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (error) {
      /* nothing kept */
    }
    tokenChanged();
  });

  // --- services -------------------------------------------------------------------------
  function servicesPage() {
    const holder = document.getElementById("services");
    const filter = document.getElementById("filter");
    const summary = document.getElementById("summary");
    for (const empty of holder.querySelectorAll("p.empty")) empty.remove();
    const sections = adoptRows(holder, (node) => node.dataset.namespace);
    const rows = new Map(); // namespace -> state of its rows
    for (const [ns, entry] of sections) {
      const tbody = entry.node.querySelector("tbody");
      if (tbody) rows.set(ns, adoptRows(tbody, (node) => node.dataset.key));
    }
    let services = null;

    function matches(search, needle) {
      return !needle || search.split("\n").some((part) => part.includes(needle));
    }

    function applyFilter() {
      const needle = filter.value.trim().toLowerCase();
      let shown = 0;
      for (const section of holder.querySelectorAll("section.namespace")) {
        let any = false;
        for (const row of section.querySelectorAll("tbody tr")) {
          const visible = matches(row.dataset.search || "", needle);
          row.hidden = !visible;
          any = any || visible;
          shown += visible;
        }
        section.hidden = !any;
      }
      if (services) {
        const instances = services.reduce((sum, s) => sum + s.instances, 0);
        let text = `${services.length} services, ${instances} instances`;
        if (needle) text += `; ${shown} match`;
        summary.textContent = text;
      } else if (needle) {
        summary.textContent = summary.textContent.replace(/; \d+ match$/, "") + `; ${shown} match`;
      } else {
        summary.textContent = summary.textContent.replace(/; \d+ match$/, "");
      }
      const url = needle ? "?q=" + encodeURIComponent(filter.value.trim()) : location.pathname;
      history.replaceState(null, "", url);
    }

    function buildRow(service, isNew) {
      const search = [service.namespace, service.service, ...service.tags].join("\n").toLowerCase();
      return el(
        "tr",
        { "data-key": service.namespace + "/" + service.service, "data-search": search, class: isNew ? "fresh" : null },
        el("th", { scope: "row", "data-label": "Service" },
          el("a", { href: servicePath(service.namespace, service.service) }, bdi(service.service))),
        el("td", { "data-label": "Instances" }, String(service.instances)),
        el("td", { "data-label": "Tags" }, tagList(service.tags)),
      );
    }

    function buildSection(group) {
      const tbody = el("tbody");
      rows.set(group.namespace, new Map());
      return el(
        "section",
        { class: "namespace", "data-namespace": group.namespace },
        el("h2", null, "Namespace ", bdi(group.namespace)),
        el("table", null,
          el("thead", null, el("tr", null,
            el("th", { scope: "col" }, "Service"),
            el("th", { scope: "col" }, "Instances"),
            el("th", { scope: "col" }, "Tags"))),
          tbody),
      );
    }

    function render(data) {
      services = data.services;
      const groups = [];
      for (const service of services) {
        const last = groups[groups.length - 1];
        if (last && last.namespace === service.namespace) last.services.push(service);
        else groups.push({ namespace: service.namespace, services: [service] });
      }
      reconcile(holder, sections, groups, (g) => g.namespace, () => "section", buildSection);
      for (const group of groups) {
        const tbody = sections.get(group.namespace).node.querySelector("tbody");
        reconcile(tbody, rows.get(group.namespace), group.services,
          (s) => s.namespace + "/" + s.service, (s) => JSON.stringify(s), buildRow);
      }
      for (const ns of [...rows.keys()]) if (!sections.has(ns)) rows.delete(ns);
      const empty = document.getElementById("nothing");
      if (services.length && empty) empty.remove();
      if (!services.length && !empty) {
        holder.after(el("p", { id: "nothing", class: "empty" }, "Nothing registered yet."));
      }
      applyFilter();
    }

    filter.addEventListener("input", applyFilter);
    filter.form.addEventListener("submit", (event) => {
      event.preventDefault();
      applyFilter();
    });
    const index = Number(body.dataset.index || 0);
    follow("/v1/services", index, render, "services");
  }

  // --- one service ----------------------------------------------------------------------
  function servicePage() {
    const ns = body.dataset.namespace;
    const svc = body.dataset.service;
    const zone = body.dataset.zone;
    const dig = body.dataset.dig;
    const tbody = document.querySelector("#instances tbody");
    const summary = document.getElementById("summary");
    const digList = document.getElementById("dig");
    const rows = adoptRows(tbody, (node) => node.dataset.key);
    const leases = new Map(); // instance -> {lease, expires (ms, server clock)}
    const asked = new Map(); // instance -> when its lease was last asked for
    let readOnly = false;
    let digSignature = null;

    for (const time of tbody.querySelectorAll("time[data-expires]")) {
      const name = time.closest("tr").dataset.key;
      leases.set(name, { lease: null, expires: Date.parse(time.dataset.expires) });
    }

    function copyButton(what, text) {
      const button = el("button", { type: "button", "aria-label": "Copy the command for " + what }, "Copy");
      button.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(text);
          button.textContent = "Copied";
        } catch (error) {
          const range = document.createRange();
          range.selectNodeContents(button.previousElementSibling);
          getSelection().removeAllRanges();
          getSelection().addRange(range);
          button.textContent = "Selected: copy it";
        }
        setTimeout(() => (button.textContent = "Copy"), 2000);
      });
      return button;
    }

    function renderDig(instances) {
      const ports = new Set();
      for (const instance of instances) {
        for (const port of instance.ports || []) ports.add(port.name + "/" + (port.protocol || "tcp"));
      }
      const signature = [...ports].sort().join(" ");
      if (signature === digSignature) return;
      digSignature = signature;
      const name = `${svc}.${ns}.svc.${zone}`;
      const lines = [["every instance's address", `${dig} +short ${name}`]];
      for (const port of [...ports].sort()) {
        const [portName, protocol] = port.split("/");
        lines.push([`port ${portName}/${protocol} (SRV)`, `${dig} +short _${portName}._${protocol}.${name} SRV`]);
      }
      digList.replaceChildren(
        ...lines.map(([what, command]) =>
          el("li", null, el("span", { class: "what" }, what), " ", el("code", null, bdi(command)), copyButton(what, command)),
        ),
      );
    }

    function countdown(name) {
      const known = leases.get(name);
      if (!known || Number.isNaN(known.expires)) return "unknown";
      const left = Math.ceil((known.expires - (Date.now() + clockSkew)) / 1000);
      return left > 0 ? `in ${left} s` : "now";
    }

    function expiryNode(name) {
      const known = leases.get(name);
      if (!known || Number.isNaN(known.expires)) return el("time", { "data-instance": name }, "…");
      const iso = new Date(known.expires).toISOString();
      return el("time", { datetime: iso, "data-expires": iso, "data-instance": name }, countdown(name));
    }

    function deregisterButton(name) {
      const button = el("button", { type: "button", class: "danger", "aria-label": `Deregister ${name}` }, "Deregister");
      button.addEventListener("click", () => deregister(name, button));
      return button;
    }

    async function deregister(name, button) {
      if (!confirm(`Deregister ${name} of ${svc}.${ns}? DNS stops answering for it at once.`)) return;
      button.disabled = true;
      let response;
      try {
        response = await api(apiPath(ns, svc) + "/instances/" + encodeURIComponent(name), { method: "DELETE" });
      } catch (error) {
        say("The server does not answer: nothing was deregistered.", true);
        button.disabled = false;
        return;
      }
      if (response.status === 204) say(`${name} deregistered.`);
      else if (response.status === 404) say(`${name} was already gone.`);
      else if (response.status === 401 || response.status === 403) {
        readOnly = true;
        showActions();
        say("This token may not deregister: that needs the write right on this namespace.", true);
      } else {
        say(`Deregistering ${name} failed: the server answered ${response.status}.`, true);
        button.disabled = false;
      }
    }

    function showActions() {
      for (const row of tbody.children) {
        const cell = row.querySelector("td.actions");
        if (!cell) continue;
        cell.replaceChildren(...(readOnly ? [] : [deregisterButton(row.dataset.key)]));
      }
    }
    document.addEventListener("discovery:token", () => {
      readOnly = false;
      showActions();
    });

    function buildRow(instance, isNew) {
      const fqdn = `${instance.name}.${svc}.${ns}.svc.${zone}`;
      const ports = (instance.ports || []).map((p) =>
        el("li", null, bdi(p.name), ` ${p.port}/${p.protocol || "tcp"}`));
      const metadata = Object.entries(instance.metadata || {}).map(([key, value]) =>
        el("div", null, el("dt", null, bdi(key)), el("dd", null, bdi(value))));
      const ttl = instance.lease ? instance.lease.ttl : instance.ttl;
      return el(
        "tr",
        { "data-key": instance.name, class: isNew ? "fresh" : null },
        el("th", { scope: "row", "data-label": "Instance" }, bdi(instance.name)),
        el("td", { "data-label": "Address" }, el("code", null, bdi(instance.address))),
        el("td", { "data-label": "Ports" }, ports.length ? el("ul", { class: "ports" }, ports) : null),
        el("td", { "data-label": "Tags" }, tagList(instance.tags)),
        el("td", { "data-label": "Metadata" }, metadata.length ? el("dl", { class: "metadata" }, metadata) : null),
        el("td", { "data-label": "Lease" }, `${ttl} s, expires `, expiryNode(instance.name)),
        el("td", { "data-label": "DNS name" }, el("code", null, bdi(fqdn))),
        el("td", { "data-label": "Actions", class: "actions" }, readOnly ? null : deregisterButton(instance.name)),
      );
    }

    // The lease's expiry is the store's to tell: ask once per lease, and again when it
    // passes (a heartbeat may have renewed it).
    const queue = [];
    let asking = 0;
    function askLease(name) {
      const now = Date.now();
      if (now - (asked.get(name) || 0) < 2000 || queue.includes(name)) return;
      asked.set(name, now);
      queue.push(name);
      pump();
    }
    async function pump() {
      while (asking < 4 && queue.length) {
        const name = queue.shift();
        asking += 1;
        try {
          const response = await api(apiPath(ns, svc) + "/instances/" + encodeURIComponent(name));
          if (response.ok) {
            const data = await response.json();
            if (data.lease && data.lease.expires_at) {
              leases.set(name, { lease: data.lease.id, expires: Date.parse(data.lease.expires_at) });
              updateExpiry(name);
            }
          }
        } catch (error) {
          /* asked again when the countdown passes */
        } finally {
          asking -= 1;
        }
      }
    }

    function updateExpiry(name) {
      const entry = rows.get(name);
      const time = entry && entry.node.querySelector("time");
      if (time) time.replaceWith(expiryNode(name));
    }

    function render(data) {
      const instances = data.instances;
      const current = new Set(instances.map((i) => i.name));
      for (const name of [...leases.keys()]) if (!current.has(name)) leases.delete(name);
      reconcile(tbody, rows, instances, (i) => i.name, (i) => JSON.stringify(i), buildRow);
      instances.slice(0, 200).forEach((instance) => {
        const known = leases.get(instance.name);
        if (!known || (known.lease !== null && known.lease !== instance.lease.id)) askLease(instance.name);
        else if (known.lease === null) known.lease = instance.lease.id;
      });
      summary.textContent = `${instances.length} live instance${instances.length === 1 ? "" : "s"}`;
      renderDig(instances);
    }

    setInterval(() => {
      for (const time of tbody.querySelectorAll("time[data-expires]")) {
        const name = time.dataset.instance || time.closest("tr").dataset.key;
        const text = countdown(name);
        if (time.textContent !== text) time.textContent = text;
        const known = leases.get(name);
        if (known && known.expires - (Date.now() + clockSkew) < -1000) askLease(name);
      }
    }, 1000);

    for (const item of digList.children) {
      const code = item.querySelector("code");
      const what = item.querySelector(".what");
      if (code) item.append(copyButton(what ? what.textContent : "this name", code.textContent));
    }
    showActions();
    for (const time of tbody.querySelectorAll("time[data-expires]")) {
      time.textContent = countdown(time.closest("tr").dataset.key);
    }
    follow(apiPath(ns, svc), Number(body.dataset.index || 0), render, "instances");
  }

  // --- networks -------------------------------------------------------------------------
  function networksPage() {
    const holder = document.getElementById("networks");

    function table(headings, rows) {
      return el("table", null,
        el("thead", null, el("tr", null, headings.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", null, rows));
    }

    function cells(labels, values) {
      return values.map((value, i) =>
        i === 0 ? el("th", { scope: "row", "data-label": labels[0] }, value)
          : el("td", { "data-label": labels[i] }, value));
    }

    function section(network, attachments) {
      const blockLabels = ["Node", "Block", "Node address", "Attachments", "Free addresses"];
      const attachmentLabels = ["Name", "Address", "Node", "Container", "Service"];
      return el("section", { class: "network", "data-network": network.name },
        el("h2", null, "Network ", bdi(network.name)),
        el("p", { class: "summary" }, el("code", null, network.subnet),
          `, /${network.node_prefix} per node, ${network.backend}, ${network.attachments} attachments`),
        el("h3", null, "Blocks per node"),
        table(blockLabels, network.blocks.map((block) => el("tr", null, cells(blockLabels, [
          bdi(block.node), el("code", null, block.subnet), bdi(block.node_ip),
          String(block.attachments), String(block.free)])))),
        el("h3", null, "Attachments"),
        table(attachmentLabels, attachments.map((a) => el("tr", null, cells(attachmentLabels, [
          bdi(a.name), el("code", null, a.address), bdi(a.node),
          [el("code", null, bdi(a.container_id.slice(0, 12))), " ", bdi(a.ifname)],
          a.service ? el("a", { href: servicePath(a.service.namespace, a.service.service) },
            bdi(a.service.service), ".", bdi(a.service.namespace)) : null])))),
      );
    }

    async function render() {
      const { data } = await fetchJson("/v1/networks");
      const sections = [];
      for (const network of data.networks) {
        const attachments = await fetchJson("/v1/networks/" + encodeURIComponent(network.name) + "/attachments");
        sections.push(section(network, attachments.data.attachments));
      }
      holder.replaceChildren(...(sections.length ? sections : [el("p", { class: "empty" }, "No networks.")]));
    }

    // Network changes move the registry's revision, which the service list's long poll
    // follows (one entry is enough): one long poll for the page, then a fresh read.
    const trigger = "/v1/services?limit=1";
    const index = Number(body.dataset.index || 0);
    if (index > 0) follow(trigger, index, render);
    else render().then(() => follow(trigger, 0, render));
  }

  // --- health ---------------------------------------------------------------------------
  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      const labels = {};
      for (const label of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[label[1]] = label[2];
      samples.push({ name: match[1], labels, value: Number(match[3]) });
    }
    return samples;
  }

  function healthPage() {
    const facts = document.getElementById("health");
    const tbody = document.querySelector("#queries tbody");
    const rows = adoptRows(tbody, (node) => node.dataset.path);
    let previous = null;

    function setFact(field, text, state) {
      const dd = facts.querySelector(`[data-field="${field}"] dd`);
      if (!dd) return;
      if (dd.textContent !== text) dd.textContent = text;
      dd.classList.toggle("up", state === true);
      dd.classList.toggle("down", state === false);
    }

    async function scrape() {
      let ready;
      try {
        const response = await api("/readyz");
        ready = await response.json();
      } catch (error) {
        setLive("The server does not answer; retrying…", true);
        return;
      }
      setFact("status", ready.status, ready.status === "ready");
      setFact("store", ready.store === "ok" ? "up" : "degraded", ready.store === "ok");
      setFact("revision", String(ready.revision));
      const since = ready.seconds_since_store_contact;
      setFact("contact", since === null ? "never" : `${since.toFixed(1)} s ago`, since !== null && since < 5);
      setFact("node", ready.node);
      let response;
      try {
        response = await api("/metrics");
      } catch (error) {
        return;
      }
      if (response.status === 401 || response.status === 403) {
        setLive("The metrics need an API token: enter it above.", true);
        return;
      }
      if (!response.ok) return;
      const samples = parseMetrics(await response.text());
      const value = (name) => (samples.find((s) => s.name === name) || { value: NaN }).value;
      setFact("services", String(value("discovery_services")));
      setFact("instances", String(value("discovery_instances")));
      setFact("reloads", String(value("discovery_watch_reloads_total")));
      setFact("resumes", String(value("discovery_watch_resumes_total")));
      const now = performance.now();
      const queries = samples.filter((s) => s.name === "discovery_dns_queries_total");
      const counts = new Map(queries.map((s) => [s.labels.path, s.value]));
      const items = [...counts.keys()].sort().map((path) => {
        let rate = "…";
        if (previous && previous.counts.has(path)) {
          const seconds = (now - previous.at) / 1000;
          rate = ((counts.get(path) - previous.counts.get(path)) / seconds).toFixed(1);
        }
        return { path, rate, total: counts.get(path) };
      });
      previous = { at: now, counts };
      reconcile(tbody, rows, items, (item) => item.path, (item) => item.rate + " " + item.total, (item) =>
        el("tr", { "data-path": item.path },
          el("th", { scope: "row", "data-label": "Path" }, item.path),
          el("td", { "data-label": "Queries/s", class: "rate" }, item.rate),
          el("td", { "data-label": "Total" }, String(item.total))));
      setLive("Live: read every 2 seconds.");
    }

    (async () => {
      for (;;) {
        await scrape();
        await sleep(2000);
      }
    })();
  }

  const pages = { services: servicesPage, service: servicePage, networks: networksPage, health: healthPage };
  const start = pages[body.dataset.page];
  if (start) start();
  else setLive("");
})();
