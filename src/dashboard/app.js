// tollgate's key dashboard (SPEC §13): signs in with an admin:keys key and drives the §6 key
// API and GET /v1/limits of the server that serves it.
//
// Security rules this file keeps (the Rust test of src/dashboard/ checks some of them):
// - the admin's key lives in the `apiKey` variable of this closure only: no web storage, no
//   cookie, no URL, no DOM after sign-in (the input is cleared at once);
// - a new key is only ever in the one-time dialog and `revealed`, both wiped when it closes;
// - nothing from the server is parsed as HTML: every text goes in through textContent.
'use strict';

(() => {
  let apiKey = null;
  let me = null;        // GET /v1/limits of the signed-in key: its id, org, scopes, tier, limits
  let keys = [];        // GET /v1/keys
  let revealed = null;  // a new key while its one-time dialog is open
  let pending = null;   // the key a dialog acts on
  let opener = null;    // where focus returns when a dialog closes

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || {};
    }
  }

  // One call to tollgate's API with the admin's key. Every failure becomes an ApiError whose
  // message is the API's own (§5 body), or says plainly what else went wrong.
  async function api(method, path, body) {
    if (apiKey === null) throw new ApiError(0, 'signed_out', 'You are signed out.');
    const headers = { Authorization: 'Bearer ' + apiKey };
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let rsp;
    try {
      rsp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'network', 'The server could not be reached (' + e.message + ').');
    }
    const text = await rsp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!rsp.ok) {
      const err = data && data.error;
      if (err && typeof err.message === 'string') {
        throw new ApiError(rsp.status, err.code, err.message, err.details);
      }
      const snippet = text ? ': ' + text.slice(0, 200) : '';
      throw new ApiError(rsp.status, 'http', 'The server answered HTTP ' + rsp.status + snippet);
    }
    if (data === null) throw new ApiError(rsp.status, 'bad_response', 'The server gave an answer that is not JSON.');
    return data;
  }

  // ---- messages -------------------------------------------------------------------------

  function say(text) {
    $('status').textContent = text;
  }

  function fail(text) {
    const a = $('alert');
    a.textContent = text;
    a.hidden = false;
  }

  function clearMessages() {
    $('alert').hidden = true;
    $('alert').textContent = '';
    say('');
  }

  function dialogError(id, text) {
    const e = $(id);
    e.textContent = text;
    e.hidden = !text;
  }

  // ---- formatting -----------------------------------------------------------------------

  function when(iso) {
    if (!iso) return null;
    return iso.slice(0, 16).replace('T', ' ') + ' UTC';
  }

  function timeEl(iso, none) {
    if (!iso) return document.createTextNode(none);
    const t = document.createElement('time');
    t.dateTime = iso;
    t.textContent = when(iso);
    return t;
  }

  function num(n) {
    return typeof n === 'number' ? n.toLocaleString('en-US') : '—';
  }

  function duration(seconds) {
    if (typeof seconds !== 'number') return '—';
    if (seconds < 1) return 'now';
    const s = Math.ceil(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (h > 0) return 'in ' + h + ' h ' + m + ' min';
    if (m > 0) return 'in ' + m + ' min ' + (s % 60) + ' s';
    return 'in ' + s + ' s';
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function cell(label, content, cls) {
    const td = el('td', null, cls);
    td.dataset.label = label;
    if (content instanceof Node) td.append(content);
    else td.textContent = content;
    return td;
  }

  function keyLabel(k) {
    return (k.name ? '“' + k.name + '” ' : '') + '(' + k.id + ')';
  }

  function parseScopes(text) {
    return text.split(/[\s,]+/).filter((s) => s.length > 0);
  }

  // ---- sign-in --------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    clearMessages();
    const input = $('signin-key');
    const key = input.value.trim();
    // Out of the DOM at once: from here on the key is in `apiKey` only.
    input.value = '';
    if (!key) {
      fail('Paste an API key with the admin:keys scope.');
      input.focus();
      return;
    }
    $('signin-submit').disabled = true;
    apiKey = key;
    try {
      const limits = await api('GET', '/v1/limits');
      let list;
      try {
        list = await api('GET', '/v1/keys');
      } catch (e) {
        if (e.status === 403) {
          const held = (limits.scopes || []).join(', ') || 'none';
          throw new ApiError(403, e.code, 'This key (' + limits.key_id + ') cannot manage keys: ' + e.message +
            ' Its scopes are: ' + held + '. Sign in with a key that has the admin:keys scope.');
        }
        throw e;
      }
      me = limits;
      keys = list.data || [];
      showApp();
    } catch (e) {
      apiKey = null;
      me = null;
      fail('Sign-in failed. ' + e.message);
      input.focus();
    } finally {
      $('signin-submit').disabled = false;
    }
  }

  function signOut(message) {
    for (const d of document.querySelectorAll('dialog')) {
      if (d.open) d.close();
    }
    wipeSecret();
    apiKey = null;
    me = null;
    keys = [];
    pending = null;
    $('keys-body').replaceChildren();
    $('limits-body').replaceChildren();
    $('audit-body').replaceChildren();
    $('audit').hidden = true;
    $('app').hidden = true;
    $('whoami').hidden = true;
    $('whoami-text').textContent = '';
    $('signin').hidden = false;
    clearMessages();
    if (message) fail(message);
    else say('Signed out. The key is forgotten.');
    $('signin-key').focus();
  }

  // A 401 in the middle of a session: the key itself stopped working (revoked, expired).
  function handle(e) {
    if (e.status === 401) {
      signOut('Your key is no longer accepted: ' + e.message);
    } else {
      fail(e.message);
    }
  }

  function showApp() {
    $('signin').hidden = true;
    $('app').hidden = false;
    $('whoami').hidden = false;
    $('whoami-text').textContent = 'Signed in with key ' + me.key_id + ' · organisation ' + me.org;
    $('org-name').textContent = me.org;
    renderLimits();
    renderKeys();
    say('Signed in. ' + keys.length + ' key' + (keys.length === 1 ? '' : 's') + ' in ' + me.org + '.');
    $('keys-title').focus();
  }

  // ---- limits ---------------------------------------------------------------------------

  const LIMIT_NAMES = {
    requests_per_second: 'Requests per second',
    daily_requests: 'Requests per day',
    tokens_per_minute: 'Tokens per minute',
    daily_tokens: 'Tokens per day',
    concurrent_requests: 'Concurrent requests',
  };

  // The three cells of each known limit. A bucket (per second, per minute) is "now" and refills
  // to full; a daily budget is "today" and resets at midnight.
  const bucket = (allowed) => (l) => [
    cell('Allowed', allowed(l)),
    cell('Remaining', l.remaining === null ? 'unknown' : num(l.remaining) + ' now'),
    cell('Resets', l.reset_seconds === null ? '—' : (l.reset_seconds > 0 ? 'full ' + duration(l.reset_seconds) : 'full')),
  ];
  const daily = (what) => (l) => [
    cell('Allowed', num(l.limit) + what + ' per day'),
    cell('Remaining', l.remaining === null ? 'unknown'
      : num(l.remaining) + ' today' + (typeof l.used === 'number' ? ' (' + num(l.used) + ' used)' : '')),
    cell('Resets', '00:00 UTC, ' + duration(l.reset_seconds)),
  ];
  const ROWS = {
    requests_per_second: bucket((l) => num(l.limit) + ' per second, burst ' + num(l.burst)),
    daily_requests: daily(''),
    tokens_per_minute: bucket((l) => num(l.limit) + ' tokens per minute'),
    daily_tokens: daily(' tokens'),
    concurrent_requests: (l) => [
      cell('Allowed', num(l.limit) + ' at once'),
      cell('Remaining', l.remaining === null ? 'unknown' : num(l.remaining) + ' free (' + num(l.in_flight) + ' in flight)'),
      cell('Resets', 'when a request ends'),
    ],
  };

  function renderLimits() {
    const per = me.applies_to ? ', shared by the ' + me.applies_to : '';
    let summary = 'Tier ' + me.tier + per + ' (' + me.backend + ' limits).';
    if (me.state !== 'ok') summary += ' ' + (me.message || 'What remains is unknown right now.');
    $('limits-summary').textContent = summary;
    const body = $('limits-body');
    body.replaceChildren();
    // The server's JSON object has no order of its own: the known limits come in this order,
    // any later one after them.
    const order = Object.keys(LIMIT_NAMES);
    const rank = (n) => (order.includes(n) ? order.indexOf(n) : order.length);
    const entries = Object.entries(me.limits || {}).sort((a, b) => rank(a[0]) - rank(b[0]));
    for (const [name, l] of entries) {
      const tr = el('tr');
      tr.dataset.limit = name;
      tr.append(cell('Limit', LIMIT_NAMES[name] || name));
      if (l === null) {
        tr.append(cell('Allowed', 'unlimited'), cell('Remaining', '—'), cell('Resets', '—'));
      } else if (Object.hasOwn(ROWS, name)) {
        tr.append(...ROWS[name](l));
      } else {
        // A limit this page does not know yet: the fields every limit has.
        tr.append(
          cell('Allowed', num(l.limit)),
          cell('Remaining', l.remaining === null || l.remaining === undefined ? 'unknown' : num(l.remaining)),
          cell('Resets', duration(l.reset_seconds)),
        );
      }
      body.append(tr);
    }
  }

  async function refreshLimits() {
    try {
      me = await api('GET', '/v1/limits');
      renderLimits();
      say('Limits refreshed.');
    } catch (e) {
      handle(e);
    }
  }

  // ---- keys -----------------------------------------------------------------------------

  function restorable(k) {
    return k.status === 'revoked' && k.restorable_until && Date.parse(k.restorable_until) > Date.now();
  }

  function button(text, label, onClick, cls) {
    const b = el('button', text, 'small' + (cls ? ' ' + cls : ''));
    b.type = 'button';
    b.setAttribute('aria-label', label);
    b.addEventListener('click', onClick);
    return b;
  }

  function renderKeys() {
    const filter = $('status-filter').value;
    const shown = keys.filter((k) => filter === 'all' || k.status === filter);
    const body = $('keys-body');
    body.replaceChildren();
    for (const k of shown) {
      const tr = el('tr');
      tr.dataset.keyId = k.id;
      if (me && k.id === me.key_id) tr.className = 'mine';
      const name = el('span', k.name || '(unnamed)');
      const nameCell = cell('Name', name);
      if (me && k.id === me.key_id) nameCell.append(el('span', ' (this key)', 'help'));
      const scopes = el('span');
      for (const s of k.scopes) scopes.append(el('code', s, 'scope'));
      const status = el('span');
      status.append(el('span', k.status, 'badge ' + k.status));
      if (k.status === 'revoked') {
        const until = restorable(k)
          ? ' Restorable until ' + when(k.restorable_until) + '.'
          : ' No longer restorable.';
        status.append(el('span', until, 'help'));
      }
      const actions = el('div', null, 'actions');
      const label = keyLabel(k);
      if (k.status === 'revoked') {
        if (restorable(k)) actions.append(button('Restore', 'Restore key ' + label, () => restore(k)));
      } else {
        actions.append(button('Revoke', 'Revoke key ' + label, (e) => confirmRevoke(k, e.currentTarget), 'danger'));
        if (k.status === 'active') {
          actions.append(button('Rotate', 'Rotate key ' + label, (e) => openRotate(k, e.currentTarget)));
        }
      }
      actions.append(button('Audit', 'Audit trail of key ' + label, (e) => showAudit(k, e.currentTarget), 'secondary'));
      tr.append(
        nameCell,
        cell('ID', k.id, 'mono'),
        cell('Scopes', scopes),
        cell('Tier', k.tier),
        cell('Workspace', k.workspace),
        cell('Status', status),
        cell('Created', timeEl(k.created_at, '—')),
        // Written in batches by the server (§2): a key used seconds ago may still say "never".
        cell('Last used', timeEl(k.last_used_at, 'never')),
        cell('Expires', timeEl(k.expires_at, 'never')),
        cell('Actions', actions),
      );
      body.append(tr);
    }
    $('keys-empty').hidden = shown.length > 0;
    $('keys-count').textContent = shown.length + ' of ' + keys.length + ' shown';
  }

  async function refreshKeys(quiet) {
    try {
      const list = await api('GET', '/v1/keys');
      keys = list.data || [];
      renderKeys();
      if (!quiet) say('Keys refreshed.');
    } catch (e) {
      handle(e);
    }
  }

  // ---- dialogs --------------------------------------------------------------------------

  function openDialog(id, from) {
    opener = from || document.activeElement;
    $(id).showModal();
  }

  function returnFocus() {
    // The row may have been re-rendered: its button is then a new element.
    if (opener && opener.isConnected) opener.focus();
    else $('keys-title').focus();
    opener = null;
  }

  function scopeBoxes(containerId, offered, checked) {
    const box = $(containerId);
    box.replaceChildren();
    const all = Array.from(new Set([...offered, ...checked])).sort();
    all.forEach((s, i) => {
      const id = containerId + '-' + i;
      const l = el('label', null, 'choice');
      l.htmlFor = id;
      const c = document.createElement('input');
      c.type = 'checkbox';
      c.id = id;
      c.value = s;
      c.checked = checked.includes(s);
      l.append(c, el('code', s));
      box.append(l);
    });
  }

  function checkedScopes(containerId, extraId) {
    const picked = Array.from($(containerId).querySelectorAll('input:checked')).map((c) => c.value);
    return Array.from(new Set([...picked, ...parseScopes($(extraId).value)])).sort();
  }

  // ---- create ---------------------------------------------------------------------------

  function openCreate(e) {
    $('create-form').reset();
    $('create-custom').hidden = true;
    dialogError('create-error', '');
    scopeBoxes('create-scope-list', me.scopes || [], []);
    openDialog('create-dialog', e.currentTarget);
    $('create-name').focus();
  }

  async function create(event) {
    event.preventDefault();
    dialogError('create-error', '');
    const body = {};
    const name = $('create-name').value.trim();
    if (name) body.name = name;
    const preset = $('create-form').querySelector('input[name="preset"]:checked').value;
    if (preset === 'custom') {
      body.scopes = checkedScopes('create-scope-list', 'create-extra');
      if (body.scopes.length === 0) {
        dialogError('create-error', 'Choose at least one scope, or a preset.');
        return;
      }
    } else if (preset !== 'default') {
      body.scopes = [preset];
    }
    const expiry = $('create-expiry').value;
    if (expiry) body.expires_in = expiry;
    $('create-submit').disabled = true;
    try {
      const created = await api('POST', '/v1/keys', body);
      $('create-dialog').close();
      await refreshKeys(true);
      reveal(created, null);
      say('Created key ' + keyLabel(created) + ' with scopes ' + created.scopes.join(', ') + '.');
    } catch (e) {
      if (e.status === 401) handle(e);
      else dialogError('create-error', e.message);
    } finally {
      $('create-submit').disabled = false;
    }
  }

  // ---- the one-time display of a new key -----------------------------------------------

  function reveal(created, rotatedFrom) {
    revealed = created.key;
    $('secret-value').value = revealed;
    $('secret-copied').textContent = '';
    const note = $('secret-rotate-note');
    if (rotatedFrom) {
      note.textContent = 'Deploy the new key to your secret store and confirm traffic on it, then revoke the old key ' +
        keyLabel(rotatedFrom) + ': it keeps working until you do.';
      note.hidden = false;
    } else {
      note.textContent = '';
      note.hidden = true;
    }
    opener = $('keys-title');
    $('secret-dialog').showModal();
    $('secret-value').focus();
    $('secret-value').select();
  }

  function wipeSecret() {
    revealed = null;
    $('secret-value').value = '';
    $('secret-copied').textContent = '';
  }

  async function copySecret() {
    if (revealed === null) return;
    try {
      await navigator.clipboard.writeText(revealed);
      $('secret-copied').textContent = 'Copied to the clipboard.';
    } catch (_) {
      // No clipboard permission: leave it selected for Ctrl+C.
      $('secret-value').focus();
      $('secret-value').select();
      $('secret-copied').textContent = 'Copying is not allowed here: the key is selected, press Ctrl+C (⌘C).';
    }
  }

  // ---- revoke / restore -----------------------------------------------------------------

  function confirmRevoke(k, from) {
    pending = k;
    dialogError('confirm-error', '');
    $('confirm-title').textContent = 'Revoke key ' + keyLabel(k) + '?';
    let text = 'Requests with key ' + keyLabel(k) + ' will be refused at once (401). ' +
      'It can be restored within the retention period; the table then shows until when.';
    if (me && k.id === me.key_id) text += ' This is the key you are signed in with: you will be signed out.';
    $('confirm-text').textContent = text;
    $('confirm-yes').textContent = 'Revoke ' + (k.name || k.id);
    openDialog('confirm-dialog', from);
    $('confirm-yes').focus();
  }

  async function revoke() {
    const k = pending;
    if (!k) return;
    $('confirm-yes').disabled = true;
    try {
      const r = await api('POST', '/v1/keys/' + encodeURIComponent(k.id) + '/revoke');
      $('confirm-dialog').close();
      pending = null;
      await refreshKeys(true);
      const until = r.restorable_until ? ' It can be restored until ' + when(r.restorable_until) + '.' : '';
      say('Revoked key ' + keyLabel(r) + '.' + until);
    } catch (e) {
      if (e.status === 401) handle(e);
      else dialogError('confirm-error', e.message);
    } finally {
      $('confirm-yes').disabled = false;
    }
  }

  async function restore(k) {
    clearMessages();
    try {
      const r = await api('POST', '/v1/keys/' + encodeURIComponent(k.id) + '/restore');
      await refreshKeys(true);
      say('Restored key ' + keyLabel(r) + '; it works again.');
      $('keys-title').focus();
    } catch (e) {
      handle(e);
    }
  }

  // ---- rotate ---------------------------------------------------------------------------

  function openRotate(k, from) {
    pending = k;
    $('rotate-form').reset();
    dialogError('rotate-error', '');
    $('rotate-title').textContent = 'Rotate key ' + keyLabel(k);
    $('rotate-text').textContent = 'A new key is created for the same organisation, tier and workspace, with the ' +
      'scopes checked below (the old key\'s, unless you change them). The old key keeps working until you revoke it.';
    scopeBoxes('rotate-scope-list', me.scopes || [], k.scopes);
    openDialog('rotate-dialog', from);
    $('rotate-submit').focus();
  }

  async function rotate(event) {
    event.preventDefault();
    const k = pending;
    if (!k) return;
    dialogError('rotate-error', '');
    const scopes = checkedScopes('rotate-scope-list', 'rotate-extra');
    if (scopes.length === 0) {
      dialogError('rotate-error', 'Choose at least one scope.');
      return;
    }
    const same = scopes.length === k.scopes.length && scopes.every((s) => k.scopes.includes(s));
    $('rotate-submit').disabled = true;
    try {
      // Unchanged scopes are not sent: the server then inherits them itself.
      const created = await api('POST', '/v1/keys/' + encodeURIComponent(k.id) + '/rotate', same ? undefined : { scopes });
      $('rotate-dialog').close();
      pending = null;
      await refreshKeys(true);
      reveal(created, k);
      say('Rotated key ' + keyLabel(k) + ': new key ' + created.id + '. Revoke the old key once the new one is deployed.');
    } catch (e) {
      if (e.status === 401) handle(e);
      else dialogError('rotate-error', e.message);
    } finally {
      $('rotate-submit').disabled = false;
    }
  }

  // ---- audit ----------------------------------------------------------------------------

  async function showAudit(k, from) {
    try {
      const trail = await api('GET', '/v1/keys/' + encodeURIComponent(k.id) + '/audit');
      const body = $('audit-body');
      body.replaceChildren();
      for (const ev of trail.data || []) {
        const tr = el('tr');
        const actor = ev.actor + (me && ev.actor === me.key_id ? ' (you)' : '');
        tr.append(
          cell('Action', ev.action),
          cell('Actor', actor, 'mono'),
          cell('Time', timeEl(ev.at, '—')),
          cell('Detail', ev.detail || ''),
        );
        body.append(tr);
      }
      if (!body.children.length) {
        const tr = el('tr');
        tr.append(cell('Action', 'No audit records.'));
        body.append(tr);
      }
      $('audit-key').textContent = keyLabel(k);
      $('audit').hidden = false;
      opener = from;
      $('audit-title').focus();
    } catch (e) {
      handle(e);
    }
  }

  function closeAudit() {
    $('audit').hidden = true;
    $('audit-body').replaceChildren();
    returnFocus();
  }

  // ---- wiring ---------------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', () => {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => signOut(null));
    $('limits-refresh').addEventListener('click', refreshLimits);
    $('keys-refresh').addEventListener('click', () => refreshKeys(false));
    $('status-filter').addEventListener('change', renderKeys);
    $('create-open').addEventListener('click', openCreate);
    $('create-form').addEventListener('submit', create);
    $('create-form').addEventListener('change', (e) => {
      if (e.target.name === 'preset') $('create-custom').hidden = e.target.value !== 'custom';
    });
    $('confirm-yes').addEventListener('click', revoke);
    $('rotate-form').addEventListener('submit', rotate);
    $('secret-copy').addEventListener('click', copySecret);
    // Wiped before it closes: the dialog's `close` event (which also wipes, for Escape) comes a
    // task later, and the key must not outlive the dialog by even that long.
    $('secret-close').addEventListener('click', () => {
      wipeSecret();
      $('secret-dialog').close();
    });
    $('audit-close').addEventListener('click', closeAudit);
    for (const b of document.querySelectorAll('[data-close]')) {
      b.addEventListener('click', () => $(b.dataset.close).close());
    }
    // However a dialog closes (button, Escape), focus goes back and a shown key is wiped.
    for (const d of document.querySelectorAll('dialog')) {
      d.addEventListener('close', () => {
        if (d.id === 'secret-dialog') wipeSecret();
        if (d.id === 'confirm-dialog' || d.id === 'rotate-dialog') pending = null;
        returnFocus();
      });
    }
    $('signin-key').focus();
  });
})();
