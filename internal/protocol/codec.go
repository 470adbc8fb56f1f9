package protocol

import (
	"encoding/json"
	"strconv"
	"time"
)

// Every invocation sends one Invoke header and gets one Result header back.
// encoding/json's reflection on them was a large share of the framing cost
// on both sides (and of the server's CPU), so these two headers have a
// hand-written codec. The wire format is unchanged: the encoder writes the
// JSON encoding/json would accept, and the decoder reads the flat objects
// it writes. Anything the fast decoder does not handle exactly as
// encoding/json would (escapes, non-ASCII text, null, nested values,
// unknown or duplicate keys, numbers that are not plain integers) is
// decoded by encoding/json instead, so both decoders always agree.

// appendHeader appends header's JSON to b: through the fast encoders for
// Invoke and Result, through encoding/json for the rest.
func appendHeader(b []byte, header any) ([]byte, error) {
	switch h := header.(type) {
	case Invoke:
		return h.appendJSON(b), nil
	case *Invoke:
		if h != nil {
			return h.appendJSON(b), nil
		}
	case Result:
		return h.appendJSON(b), nil
	case *Result:
		if h != nil {
			return h.appendJSON(b), nil
		}
	}
	j, err := json.Marshal(header)
	if err != nil {
		return b, err
	}
	return append(b, j...), nil
}

// decodeHeader unmarshals a header into v: through the fast decoders for
// Invoke and Result when the header is within what they read exactly,
// through encoding/json otherwise.
func decodeHeader(data []byte, v any) error {
	switch h := v.(type) {
	// Like encoding/json, fields the header does not name keep the
	// values they had.
	case *Invoke:
		if h != nil {
			fast := *h
			if fast.decodeFast(data) {
				*h = fast
				return nil
			}
		}
	case *Result:
		if h != nil {
			fast := *h
			if fast.decodeFast(data) {
				*h = fast
				return nil
			}
		}
	}
	return json.Unmarshal(data, v)
}

func (m *Invoke) appendJSON(b []byte) []byte {
	b = append(b, `{"RequestID":`...)
	b = appendString(b, m.RequestID)
	b = append(b, `,"DeadlineUnixMs":`...)
	b = strconv.AppendInt(b, m.DeadlineUnixMs, 10)
	b = append(b, `,"FunctionARN":`...)
	b = appendString(b, m.FunctionARN)
	if m.TraceID != "" {
		b = append(b, `,"TraceID":`...)
		b = appendString(b, m.TraceID)
	}
	if m.ClientContext != "" {
		b = append(b, `,"ClientContext":`...)
		b = appendString(b, m.ClientContext)
	}
	if m.CognitoIdentity != "" {
		b = append(b, `,"CognitoIdentity":`...)
		b = appendString(b, m.CognitoIdentity)
	}
	if m.HostUnixNano != 0 {
		b = append(b, `,"HostUnixNano":`...)
		b = strconv.AppendInt(b, m.HostUnixNano, 10)
	}
	return append(b, '}')
}

func (m *Invoke) decodeFast(data []byte) bool {
	sc := flatScanner{data: data}
	for {
		key, v, ok := sc.next()
		if !ok {
			return sc.complete()
		}
		switch string(key) {
		case "RequestID":
			m.RequestID, ok = v.str()
		case "DeadlineUnixMs":
			m.DeadlineUnixMs, ok = v.int()
		case "FunctionARN":
			m.FunctionARN, ok = v.str()
		case "TraceID":
			m.TraceID, ok = v.str()
		case "ClientContext":
			m.ClientContext, ok = v.str()
		case "CognitoIdentity":
			m.CognitoIdentity, ok = v.str()
		case "HostUnixNano":
			m.HostUnixNano, ok = v.int()
		default:
			ok = false
		}
		if !ok {
			return false
		}
	}
}

func (m *Result) appendJSON(b []byte) []byte {
	b = append(b, `{"RequestID":`...)
	b = appendString(b, m.RequestID)
	if m.FunctionError != "" {
		b = append(b, `,"FunctionError":`...)
		b = appendString(b, m.FunctionError)
	}
	if m.ErrorType != "" {
		b = append(b, `,"ErrorType":`...)
		b = appendString(b, m.ErrorType)
	}
	b = append(b, `,"PayloadLen":`...)
	b = strconv.AppendInt(b, int64(m.PayloadLen), 10)
	b = append(b, `,"LogBytes":`...)
	b = strconv.AppendInt(b, m.LogBytes, 10)
	b = append(b, `,"Duration":`...)
	b = strconv.AppendInt(b, int64(m.Duration), 10)
	if m.InitDuration != 0 {
		b = append(b, `,"InitDuration":`...)
		b = strconv.AppendInt(b, int64(m.InitDuration), 10)
	}
	if m.RestoreDuration != 0 {
		b = append(b, `,"RestoreDuration":`...)
		b = strconv.AppendInt(b, int64(m.RestoreDuration), 10)
	}
	b = append(b, `,"MaxMemoryMB":`...)
	b = strconv.AppendInt(b, int64(m.MaxMemoryMB), 10)
	if m.Reset {
		b = append(b, `,"Reset":true`...)
	}
	return append(b, '}')
}

func (m *Result) decodeFast(data []byte) bool {
	sc := flatScanner{data: data}
	for {
		key, v, ok := sc.next()
		if !ok {
			return sc.complete()
		}
		var n int64
		switch string(key) {
		case "RequestID":
			m.RequestID, ok = v.str()
		case "FunctionError":
			m.FunctionError, ok = v.str()
		case "ErrorType":
			m.ErrorType, ok = v.str()
		case "PayloadLen":
			n, ok = v.intSize(strconv.IntSize)
			m.PayloadLen = int(n)
		case "LogBytes":
			m.LogBytes, ok = v.int()
		case "Duration":
			n, ok = v.int()
			m.Duration = time.Duration(n)
		case "InitDuration":
			n, ok = v.int()
			m.InitDuration = time.Duration(n)
		case "RestoreDuration":
			n, ok = v.int()
			m.RestoreDuration = time.Duration(n)
		case "MaxMemoryMB":
			n, ok = v.intSize(strconv.IntSize)
			m.MaxMemoryMB = int(n)
		case "Reset":
			m.Reset, ok = v.bool()
		default:
			ok = false
		}
		if !ok {
			return false
		}
	}
}

// plainByte reports whether c may stand for itself inside a JSON string
// both when encoding/json writes it and when it reads it: printable ASCII
// other than the quote, the backslash and the characters encoding/json
// escapes for HTML.
func plainByte(c byte) bool {
	return c >= 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
}

// appendString appends s as a JSON string; text that is not plain goes
// through encoding/json, which escapes it.
func appendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if !plainByte(s[i]) {
			j, _ := json.Marshal(s) // a string always marshals
			return append(b, j...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

// value is one raw scalar of a flat object, as scanFlat found it.
type value struct {
	raw    []byte // string contents without quotes, or the literal
	quoted bool
}

func (v value) str() (string, bool) {
	if !v.quoted {
		return "", false
	}
	return string(v.raw), true
}

func (v value) int() (int64, bool) { return v.intSize(64) }

// intSize reads a plain decimal integer that fits in bits, as
// encoding/json does for an int of that size; anything else (a fraction,
// an exponent, an overflow) is left to encoding/json.
func (v value) intSize(bits int) (int64, bool) {
	if v.quoted || len(v.raw) == 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(string(v.raw), 10, bits)
	if err != nil {
		return 0, false
	}
	// JSON allows no leading zeros or plus sign, which ParseInt would take.
	digits := v.raw
	if digits[0] == '-' {
		digits = digits[1:]
	}
	if len(digits) == 0 || digits[0] == '+' || (digits[0] == '0' && len(digits) > 1) {
		return 0, false
	}
	return n, true
}

func (v value) bool() (bool, bool) {
	if v.quoted {
		return false, false
	}
	switch string(v.raw) {
	case "true":
		return true, true
	case "false":
		return false, true
	}
	return false, false
}

// flatScanner walks a JSON object whose values are plain strings
// (printable ASCII, no escapes), integers or booleans. next returns one key
// and value at a time; when it reports false, complete says whether the
// object ended well. Anything else (and a key seen twice, which
// encoding/json resolves its own way) stops it with complete false, and the
// caller leaves the decoding to encoding/json.
type flatScanner struct {
	data  []byte
	i     int
	state int8       // 0: before '{', 1: in the object, 2: ended well, 3: failed
	seen  [12][]byte // more keys than any fast-decoded header has
	nseen int
}

func (s *flatScanner) fail() ([]byte, value, bool) {
	s.state = 3
	return nil, value{}, false
}

func (s *flatScanner) complete() bool { return s.state == 2 }

func (s *flatScanner) next() (key []byte, v value, ok bool) {
	data := s.data
	i := s.i
	switch s.state {
	case 0:
		i = skipSpace(data, i)
		if i >= len(data) || data[i] != '{' {
			return s.fail()
		}
		i = skipSpace(data, i+1)
		if i < len(data) && data[i] == '}' {
			if skipSpace(data, i+1) != len(data) {
				return s.fail()
			}
			s.state = 2
			return nil, value{}, false
		}
		s.state = 1
	case 1:
	default:
		return nil, value{}, false
	}
	key, i, ok = scanString(data, i)
	if !ok || s.nseen == len(s.seen) {
		return s.fail()
	}
	for _, k := range s.seen[:s.nseen] {
		if string(k) == string(key) {
			return s.fail()
		}
	}
	s.seen[s.nseen] = key
	s.nseen++
	i = skipSpace(data, i)
	if i >= len(data) || data[i] != ':' {
		return s.fail()
	}
	i = skipSpace(data, i+1)
	if i < len(data) && data[i] == '"' {
		var raw []byte
		if raw, i, ok = scanString(data, i); !ok {
			return s.fail()
		}
		v = value{raw: raw, quoted: true}
	} else {
		start := i
		for i < len(data) && (data[i] == '-' || data[i] >= '0' && data[i] <= '9' || data[i] >= 'a' && data[i] <= 'z') {
			i++
		}
		v = value{raw: data[start:i]}
	}
	i = skipSpace(data, i)
	if i >= len(data) {
		return s.fail()
	}
	switch data[i] {
	case ',':
		s.i = skipSpace(data, i+1)
	case '}':
		if skipSpace(data, i+1) != len(data) {
			return s.fail()
		}
		s.state = 2
		s.i = len(data)
		// The last pair is returned now; the next call reports the end.
		return key, v, true
	default:
		return s.fail()
	}
	return key, v, true
}

// scanString reads a JSON string of plain bytes at data[i] and returns its
// contents and the index after its closing quote.
func scanString(data []byte, i int) (s []byte, next int, ok bool) {
	if i >= len(data) || data[i] != '"' {
		return nil, 0, false
	}
	start := i + 1
	for j := start; j < len(data); j++ {
		c := data[j]
		if c == '"' {
			return data[start:j], j + 1, true
		}
		if c < 0x20 || c >= 0x7f || c == '\\' {
			return nil, 0, false
		}
	}
	return nil, 0, false
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}
