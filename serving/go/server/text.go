package server

// Chat templates, stop strings and the text a stream may send so far.

import (
	"strings"
	"unicode/utf8"
)

// chatPieces splits a conversation into the texts llm_jax's SFT data
// renders (llm_jax/data/sft.py render): per message the template's head, then
// the content with the template's tail, each tokenized on its own; then the
// head of an assistant message, which the model continues.
func chatPieces(template string, roles, contents []string) ([]string, bool) {
	if strings.Count(template, "{content}") != 1 {
		return nil, false
	}
	var pieces []string
	for i, role := range roles {
		head, tail := splitTemplate(template, role)
		pieces = append(pieces, head, contents[i]+tail)
	}
	head, _ := splitTemplate(template, "assistant")
	return append(pieces, head), true
}

func splitTemplate(template, role string) (string, string) {
	filled := strings.ReplaceAll(template, "{role}", role)
	i := strings.Index(filled, "{content}")
	return filled[:i], filled[i+len("{content}"):]
}

// choiceText tracks one choice's text: where a stop string cut it and what a
// stream has sent.
type choiceText struct {
	stops   []string
	text    string // the text so far, cut before a stop string
	sent    string // what the stream has sent (a prefix of text)
	stopped bool   // a stop string appeared
}

// update takes the choice's whole text so far; it reports whether a stop
// string appeared (the text is then cut before it, and stays so).
func (c *choiceText) update(full string) bool {
	if c.stopped {
		return false
	}
	cut := -1
	for _, s := range c.stops {
		if i := strings.Index(full, s); i >= 0 && (cut < 0 || i < cut) {
			cut = i
		}
	}
	if cut >= 0 {
		c.text, c.stopped = full[:cut], true
		return true
	}
	c.text = full
	return false
}

// delta is the text a stream may send now: what extends what was sent,
// holding back a trailing replacement character (a byte-level piece whose
// other bytes are to come) and a tail that may be the start of a stop
// string. final sends everything.
func (c *choiceText) delta(final bool) string {
	safe := c.text
	if !final {
		safe = strings.TrimRight(safe, "\uFFFD")
		safe = safe[:len(safe)-c.stopPrefix(safe)]
	}
	if !strings.HasPrefix(safe, c.sent) {
		return "" // The detokenized text changed under us: send nothing wrong.
	}
	d := safe[len(c.sent):]
	c.sent = safe
	return d
}

// stopPrefix is the length of the longest tail of s that begins a stop string.
func (c *choiceText) stopPrefix(s string) int {
	longest := 0
	for _, stop := range c.stops {
		for n := len(stop) - 1; n > longest; n-- {
			if n <= len(s) && strings.HasSuffix(s, stop[:n]) {
				longest = n
				break
			}
		}
	}
	// Never split a UTF-8 character.
	for longest > 0 && longest < len(s) && !utf8.RuneStart(s[len(s)-longest]) {
		longest++
	}
	return longest
}
