/*! dailyplay.js - the DailyPlay browser SDK for game pages. No build step, no dependencies.
 *
 *   <script src="https://play.example.com/sdk/dailyplay.js"></script>
 *   <script>
 *     const gate = DailyPlay.gate({
 *       onChange(state) { render(state); },       // checking, ready, starting, playing, or a failure
 *     });
 *     playButton.onclick = async () => {
 *       const session = await gate.play();          // consumes the token; null if it could not
 *       if (session) startGame(session);
 *     };
 *   </script>
 *
 * The API's address defaults to where this script was loaded from (`apiUrl` to change it). The
 * API must allow the game page's origin (`cors.allow_origins`).
 */
(function (root) {
  "use strict";

  var VERSION = "0.1.0";
  var API_PATH = "/api/org-api-keys";
  var TOKEN_PATTERN = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
  var script = typeof document !== "undefined" ? document.currentScript : null;
  var SCRIPT_ORIGIN = script && script.src ? new URL(script.src).origin : null;

  // What a player should read for each state; pass `messages` to gate() to change any of them.
  var MESSAGES = {
    checking: "Checking your play link\u2026",
    ready: "Ready to play.",
    starting: "Starting\u2026",
    playing: "Enjoy the game!",
    missing: "This page was opened without a play link token.",
    invalid_token: "This play link is not valid (the token is malformed).",
    not_found: "This play link is not valid.",
    consumed: "This play has already been used.",
    expired: "This play link has expired.",
    revoked: "This play link has been withdrawn.",
    rate_limited: "Too many attempts. Please try again in a moment.",
    network: "The game server cannot be reached. Check your connection and try again.",
    timeout: "The game server did not answer in time. Please try again.",
    unavailable: "The game server is busy. Please try again in a moment.",
    error: "Something went wrong. Please try again."
  };
  // States after which the token can never be played.
  var FINAL = { missing: 1, invalid_token: 1, not_found: 1, consumed: 1, expired: 1, revoked: 1 };

  /** An API failure. `code` is one of the MESSAGES keys (not_found, consumed, expired, revoked,
   *  rate_limited, invalid_token, network, timeout, unavailable, error); `status` the HTTP
   *  status (0 when no answer came); `retryAfter` seconds, when the server said. */
  function DailyPlayError(code, message, status, retryAfter, requestId) {
    var error = new Error(message);
    Object.setPrototypeOf(error, DailyPlayError.prototype);
    error.name = "DailyPlayError";
    error.code = code;
    error.status = status || 0;
    error.retryAfter = retryAfter == null ? null : retryAfter;
    error.requestId = requestId || null;
    return error;
  }
  DailyPlayError.prototype = Object.create(Error.prototype, {
    constructor: { value: DailyPlayError }
  });

  /** The session token in a page URL (`?token=` or `#token=`), or null when there is none.
   *  A malformed value is returned as is: validate() reports it as invalid_token. */
  function tokenFromUrl(url, param) {
    var location = new URL(url || root.location.href);
    var name = param || "token";
    var token = location.searchParams.get(name);
    if (!token && location.hash) {
      token = new URLSearchParams(location.hash.slice(1)).get(name);
    }
    return token ? token.trim() : null;
  }

  function codeFor(status, message) {
    if (status === 404) return "not_found";
    if (status === 410) {
      var text = String(message).toLowerCase();
      if (text.indexOf("consumed") >= 0) return "consumed";
      if (text.indexOf("revoked") >= 0) return "revoked";
      return "expired";
    }
    if (status === 429) return "rate_limited";
    if (status === 400) return "invalid_token";
    if (status === 503 || status === 502 || status === 504) return "unavailable";
    return "error";
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  /** A low-level client: validate() and consume(), each resolving to the API's `data`, with
   *  camelCase names, or rejecting with a DailyPlayError. */
  function client(options) {
    options = options || {};
    var base = String(options.apiUrl || SCRIPT_ORIGIN || root.location.origin).replace(/\/+$/, "");
    var timeoutMs = options.timeoutMs || 10000;
    var retries = options.retries == null ? 2 : options.retries;
    var fetchImpl = options.fetch || root.fetch.bind(root);

    function once(method, query, body) {
      var controller = new AbortController();
      var timer = setTimeout(function () { controller.abort(); }, timeoutMs);
      var init = { method: method, signal: controller.signal, credentials: "omit" };
      if (body) {
        init.headers = { "content-type": "application/json" };
        init.body = JSON.stringify(body);
      }
      return fetchImpl(base + API_PATH + "?" + new URLSearchParams(query), init)
        .then(function (response) {
          return response.text().then(function (text) {
            return { response: response, text: text };
          });
        })
        .catch(function (failure) {
          clearTimeout(timer);
          if (failure && failure.name === "AbortError") {
            throw DailyPlayError("timeout", "no answer within " + timeoutMs + " ms", 0);
          }
          throw DailyPlayError("network", String((failure && failure.message) || failure), 0);
        })
        .then(function (answer) {
          clearTimeout(timer);
          var response = answer.response;
          var parsed = null;
          try { parsed = JSON.parse(answer.text); } catch (ignored) { parsed = null; }
          if (response.ok && parsed && parsed.success) return parsed.data;
          var message = parsed && parsed.error ? parsed.error : "HTTP " + response.status;
          var retryAfter = response.headers.has("retry-after")
            ? Number(response.headers.get("retry-after"))
            : NaN;
          throw DailyPlayError(
            codeFor(response.status, message),
            message,
            response.status,
            isFinite(retryAfter) ? retryAfter : null,
            response.headers.get("x-request-id")
          );
        });
    }

    // Reads are repeated after network failures, timeouts and 502-504; consume never is.
    function read(query) {
      var attempt = 0;
      function tryOnce() {
        return once("GET", query).catch(function (error) {
          var again = { network: 1, timeout: 1, unavailable: 1 }[error.code];
          if (!again || attempt >= retries) throw error;
          var wait = error.retryAfter != null ? error.retryAfter * 1000 : 200 * Math.pow(2, attempt);
          if (wait > 10000) throw error;
          attempt += 1;
          return sleep(Math.random() * wait).then(tryOnce);
        });
      }
      return tryOnce();
    }

    function checkToken(token) {
      if (!token || !TOKEN_PATTERN.test(token)) {
        return Promise.reject(DailyPlayError("invalid_token", "not a session token", 0));
      }
      return null;
    }

    return {
      apiUrl: base,
      /** { valid, status, gameId, streamId, expiresAt (Date), externalRef, metadata } */
      validate: function (token) {
        return checkToken(token) || read({ action: "validate-session", token: token }).then(
          function (data) {
            return {
              valid: data.valid,
              status: data.status,
              gameId: data.game_id,
              streamId: data.stream_id,
              expiresAt: new Date(data.expires_at),
              externalRef: data.external_ref,
              metadata: data.metadata
            };
          }
        );
      },
      /** Uses the token up: { sessionId, orgId, gameId, streamId, externalRef, metadata }. */
      consume: function (token, extra) {
        var body = { token: token };
        if (extra && extra.playerUuid) body.player_uuid = String(extra.playerUuid);
        return checkToken(token) || once("POST", { action: "consume-session" }, body).then(
          function (data) {
            return {
              sessionId: data.session_id,
              orgId: data.org_id,
              gameId: data.game_id,
              streamId: data.stream_id,
              externalRef: data.external_ref,
              metadata: data.metadata
            };
          }
        );
      }
    };
  }

  /** What a game page needs: read the token from the URL, validate it, and consume it on play.
   *  options: apiUrl, token (default: from the URL), playerUuid, messages, onChange(state).
   *  state: { name, message, final, token, session, error }; `final` means it cannot be played.
   *  Returns { play(), refresh(), state() }. */
  function gate(options) {
    options = options || {};
    var api = client(options);
    var messages = Object.assign({}, MESSAGES, options.messages || {});
    var token = options.token !== undefined ? options.token : tokenFromUrl();
    var current = null;

    function set(name, extra) {
      current = Object.assign(
        { name: name, message: messages[name] || messages.error, final: !!FINAL[name],
          token: token, session: null, error: null },
        extra || {}
      );
      if (options.onChange) options.onChange(current);
      return current;
    }

    function failed(error) {
      var name = error && error.code && messages[error.code] ? error.code : "error";
      return set(name, { error: error });
    }

    function refresh() {
      if (!token) return Promise.resolve(set("missing"));
      set("checking");
      return api.validate(token).then(
        function (result) {
          return result.valid ? set("ready", { session: result }) : set(result.status);
        },
        failed
      );
    }

    function play() {
      if (!current || current.name !== "ready") return Promise.resolve(null);
      var validated = current.session;
      set("starting", { session: validated });
      return api.consume(token, { playerUuid: options.playerUuid }).then(
        function (session) {
          set("playing", { session: session });
          return session;
        },
        function (error) {
          failed(error);
          return null;
        }
      );
    }

    var ready = refresh();
    return {
      play: play,
      refresh: refresh,
      ready: ready,
      state: function () { return current; }
    };
  }

  root.DailyPlay = {
    version: VERSION,
    client: client,
    gate: gate,
    tokenFromUrl: tokenFromUrl,
    DailyPlayError: DailyPlayError,
    MESSAGES: MESSAGES
  };
})(typeof window !== "undefined" ? window : globalThis);
