"""Write the demo project's data: ``queries.csv`` and ``golden.csv`` (columns ``text,reference``).

The demo is customer-support intent classification for a card and payments app, with the eight
intents in ``labels.txt``. The queries were written by the DistillHub team for the product (not
taken from any public dataset): for each intent a hand-written list of message templates with
slots (amounts, merchants, time spans, ...), plus greetings, sign-offs, lower-case and a few
common typos, so the queries read like real support messages, short and long.

Deterministic: a fixed seed per intent, so running it again rewrites the same files byte for byte.
Run ``python demo/build_data.py`` after editing the phrase lists; tests/test_demo_data.py checks
the result (counts per intent, no duplicates after normalisation, golden set disjoint).
"""
from __future__ import annotations

import csv
import random
import re
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PER_INTENT = 45  # queries per intent in queries.csv (8 intents -> 360 rows)

SLOTS = {
    "days": ["3 days", "a week", "two weeks", "10 days", "over a fortnight", "5 working days", "almost a month"],
    "amount": ["£20", "$45", "€120", "£7.99", "$300", "50 euros", "£1,200", "$12.50"],
    "merchant": ["Amazon", "the airline", "a hotel in Lisbon", "the shop", "Zara", "Uber", "eBay", "a concert ticket site"],
    "cur_from": ["pounds", "GBP", "euros", "EUR", "dollars", "USD"],
    "cur_to": ["euros", "US dollars", "Japanese yen", "Swiss francs", "Polish zloty", "Canadian dollars", "Thai baht"],
    "place": ["Spain", "the US", "Japan", "Thailand", "Poland", "Mexico"],
    "recipient": ["my landlord", "my brother", "the wrong account", "a supplier", "my friend", "someone I don't know"],
    "method": ["Apple Pay", "my debit card", "a bank transfer", "Google Pay", "my credit card", "cash at a shop"],
    "where": ["on the bus", "at the airport", "in a taxi", "at the gym", "on holiday", "at a bar last night"],
}

TEMPLATES: dict[str, list[str]] = {
    "card_arrival": [
        "I ordered a new card {days} ago and it still hasn't arrived",
        "When will my card arrive?",
        "My card hasn't come in the post yet, how long does delivery usually take?",
        "Still waiting on my card, it's been {days}",
        "How can I track the card you sent me?",
        "The app says my card was dispatched {days} ago but nothing has arrived",
        "Is there a way to see where my new card is?",
        "card still not delivered",
        "I moved house, will my replacement card go to the old address? It hasn't shown up",
        "How long does it take for a physical card to be delivered to {place}?",
        "My debit card should have been here by now",
        "Has my card actually been sent? I've heard nothing for {days}",
        "waiting for my card to arrive, any update?",
        "The card I ordered is late, what should I do?",
        "I got a text saying my card is on its way, when does it usually turn up?",
        "Can you tell me the expected delivery date of my new card?",
        "My replacement card never arrived",
        "I've checked the mailbox every day for {days} and there is still no card",
    ],
    "lost_or_stolen_card": [
        "I lost my card {where}",
        "My wallet was stolen {where} and my card was in it",
        "Someone stole my card, please block it",
        "I can't find my card anywhere, what do I do?",
        "How do I freeze my card? I think I've lost it",
        "my card got stolen",
        "I left my card {where} and now it's gone",
        "Please cancel my card, it was taken from my bag {where}",
        "I think my card was pickpocketed {where}",
        "Lost card, need to block it right now",
        "My purse was stolen with my bank card inside, can you stop the card?",
        "I dropped my card somewhere {where}, can I get a new one?",
        "Report a stolen card",
        "My card is missing and I'm worried someone will use it",
        "What should I do if my card has been stolen abroad in {place}?",
        "Can I lock my card from the app? I've misplaced it",
        "Someone took my card {where}, I need it blocked",
    ],
    "refund_not_showing_up": [
        "{merchant} says they refunded me {days} ago but I can't see the money",
        "Where is my refund? It's not in my account",
        "I returned an item to {merchant} and the refund of {amount} hasn't appeared",
        "refund still not showing",
        "The shop issued a refund but my balance hasn't changed",
        "How long do refunds take to show up? {merchant} refunded {amount} {days} ago",
        "I was promised a refund of {amount} and it's missing from my statement",
        "My refund from {merchant} is nowhere to be seen",
        "The merchant sent me a refund confirmation but no money arrived",
        "Why can't I see the refund for my cancelled order?",
        "I got an email saying my money was refunded, but the app shows nothing",
        "A refund of {amount} should have reached my card by now",
        "{merchant} refunded my payment, why is it not in my account yet?",
        "Still no sign of my refund after {days}",
        "Can you check if a refund from {merchant} has been received?",
        "refund of {amount} not credited to my account",
    ],
    "exchange_rate": [
        "What exchange rate do you use for {cur_from} to {cur_to}?",
        "How much will I get if I change {amount} into {cur_to}?",
        "Is your exchange rate the same as the one on Google?",
        "What's today's rate from {cur_from} to {cur_to}?",
        "Do you add a markup on the exchange rate when I pay in {place}?",
        "which exchange rate applies when I pay abroad",
        "The rate I got when paying in {place} looks worse than expected, how is it calculated?",
        "Does the exchange rate change at the weekend?",
        "How do you work out the conversion rate for card payments in {cur_to}?",
        "Why was I charged a different rate than the one shown in the app?",
        "Can I see the exchange rate before I convert my money?",
        "What rate will I get if I exchange {cur_from} for {cur_to} right now?",
        "Is the currency conversion rate fixed or does it move during the day?",
        "I'm travelling to {place}, what exchange rate will my card use?",
        "exchange rate for {cur_to} please",
        "Where can I find the current exchange rates?",
    ],
    "change_pin": [
        "How do I change my PIN?",
        "I want to set a new PIN for my card",
        "Can I change my card PIN in the app?",
        "I forgot my PIN, how can I reset it?",
        "change pin",
        "Where do I go to update the PIN on my debit card?",
        "Is it possible to pick my own PIN?",
        "My PIN is too easy to guess, I'd like a different one",
        "How can I change the PIN number at a cash machine?",
        "I need to reset my PIN because I keep forgetting it",
        "can I choose a new pin for my new card",
        "What's the process for changing the PIN on my card?",
        "I entered the wrong PIN three times, how do I set a new one?",
        "Do I have to visit an ATM to change my PIN?",
        "please help me change my card's PIN code",
        "I'd like to swap my PIN for a number I can remember",
    ],
    "cancel_transfer": [
        "I sent {amount} to {recipient} by mistake, can I cancel it?",
        "How do I cancel a transfer I just made?",
        "Please stop the payment I sent to {recipient}",
        "cancel my transfer",
        "I made a transfer to {recipient} and need to reverse it",
        "Can I undo a bank transfer of {amount}?",
        "I typed the wrong account number, please cancel the transfer",
        "Is it too late to cancel the money I sent to {recipient} an hour ago?",
        "I want to stop a pending transfer of {amount}",
        "How can I call back a payment I sent to {recipient}?",
        "Accidentally sent money twice, can you cancel the second transfer?",
        "I scheduled a transfer for tomorrow, how do I cancel it?",
        "Please reverse the transfer I made this morning",
        "The transfer to {recipient} was a mistake, I need it cancelled",
        "can a transfer be cancelled once it's sent?",
        "I need to cancel an outgoing payment of {amount} urgently",
    ],
    "top_up_failed": [
        "My top up with {method} failed",
        "I tried to top up {amount} but it didn't work",
        "Why was my top-up declined?",
        "top up not working",
        "I added money with {method} and got an error",
        "The top up of {amount} shows as failed, but was I charged?",
        "Can't top up my account using {method}",
        "My top-up keeps getting rejected, what's wrong?",
        "I tried adding {amount} to my balance and it says the top up failed",
        "Top up failed again with {method}, please help",
        "Why won't my account let me load money?",
        "The money I tried to add with {method} never went through",
        "Every time I try to top up I get 'payment failed'",
        "My top up was cancelled and I don't know why",
        "I tried to add funds by {method} but the app said something went wrong",
        "topping up with {method} fails every time",
    ],
    "account_closure": [
        "How do I close my account?",
        "I want to delete my account",
        "Please close my account and send me my remaining balance",
        "close my account",
        "I no longer need this account, how can I cancel it?",
        "Can you permanently delete my account and my data?",
        "I'm moving to {place} and want to close my account before I go",
        "What happens to my money if I close my account?",
        "I'd like to terminate my account with you",
        "How can I shut down my account completely?",
        "I want to leave and close everything, cards included",
        "Please deactivate my account",
        "Is there a fee for closing my account?",
        "I've decided to stop using the app, how do I close the account?",
        "cancel my account please",
        "I opened an account by mistake and want it closed",
    ],
}

# Written separately by hand: the golden set (reference answers checked by a person); none of
# these comes from the templates above.
GOLDEN: dict[str, list[str]] = {
    "card_arrival": [
        "It's been ages and my new card is still not here",
        "Any idea when the post will bring my card? Ordered it last Monday.",
        "Card delivery seems stuck, nothing has arrived at my flat",
        "is my card in the mail yet",
        "The card you promised me hasn't reached me, can you check the shipping status?",
        "I was told my card would arrive in a few days, it's now day twelve",
    ],
    "lost_or_stolen_card": [
        "My bag was snatched at the train station with my card inside",
        "help, I can't find my card after the party",
        "I need to report that my card has gone missing, possibly stolen",
        "Block my card now, a thief has it",
        "Lost my card while hiking, how do I stop anyone using it?",
        "My card fell out of my pocket somewhere in town",
    ],
    "refund_not_showing_up": [
        "The store refunded my jacket last week but my account doesn't show it",
        "no refund yet for the flight that was cancelled",
        "I'm missing a refund that the seller says they sent on Friday",
        "Refund confirmed by the merchant, still not on my card",
        "My money back from the online shop hasn't turned up",
        "Why does the refund I was given not appear in my transactions?",
    ],
    "exchange_rate": [
        "what rate do you give for swapping pounds to euros",
        "Are your currency rates updated live?",
        "How is the conversion worked out when I spend in dollars?",
        "I want to know the rate for converting GBP to Hungarian forint",
        "Do you charge extra on top of the interbank exchange rate?",
        "Which rate did you use on my payment in Tokyo?",
    ],
    "change_pin": [
        "Could I get a different PIN for my card?",
        "new pin please, I don't like the current one",
        "Where in the app do I update my PIN?",
        "How would I go about resetting a forgotten PIN?",
        "My PIN got blocked after wrong tries, how do I choose a new one?",
        "Set a fresh PIN on my card",
    ],
    "cancel_transfer": [
        "Oops, I sent money to the wrong person, can I get the transfer stopped?",
        "stop the payment I sent ten minutes ago",
        "Can you reverse an outgoing transfer that hasn't cleared yet?",
        "I want to cancel the standing transfer I set up for Friday",
        "I transferred rent to an old account by mistake, cancel it please",
        "Is there a way to pull back a transfer after pressing send?",
    ],
    "top_up_failed": [
        "I keep getting an error when I try to add money to my wallet",
        "topup declined for no reason",
        "Loading cash onto my account with my card didn't go through",
        "Why did adding funds fail this morning?",
        "My attempt to top up from my bank was refused",
        "The app won't accept my top-up, it just spins and then fails",
    ],
    "account_closure": [
        "Please remove my account, I'm switching banks",
        "how to close account",
        "I'd like my profile and account deleted for good",
        "Can I end my membership and withdraw everything?",
        "I want out, please close the account in my name",
        "What are the steps to cancel my account permanently?",
    ],
}

OPENERS = ["", "", "", "", "Hi, ", "Hello, ", "Hey there. ", "Hi team, ", "Good morning, ", "Quick question: ", "Hi! "]
CLOSERS = ["", "", "", "", " Thanks!", " Thank you.", " Please help.", " Cheers", " This is urgent.", " Thanks in advance.", "??"]
# Common misspellings real customers make, applied to a few queries.
TYPOS = [("received", "recieved"), ("account", "acount"), ("transfer", "tranfser"), ("please", "pls"),
         ("arrived", "arived"), ("money", "mony"), ("exchange", "exhange"), ("you", "u"), ("stolen", "stollen"),
         ("refund", "refumd"), ("because", "becuase"), ("cancel", "cancell")]


def normalise(text: str) -> str:
    """The key used for duplicates: NFKC, case-folded, whitespace collapsed, end punctuation dropped."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = re.sub(r"\s+", " ", t).strip()
    return t.rstrip(" .!?")


def _fill(template: str, rng: random.Random) -> str:
    text = re.sub(r"\{(\w+)\}", lambda m: rng.choice(SLOTS[m.group(1)]), template)
    # A slot that opens a sentence ("... ago? the shop refunded ...") gets its capital letter.
    return re.sub(r"([.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _decorate(text: str, rng: random.Random) -> str:
    opener, closer = rng.choice(OPENERS), rng.choice(CLOSERS)
    if (opener.endswith(", ") or opener.endswith(": ")) and not re.match(r"I\b", text) and text.split(" ")[0] not in {"PIN", "Google", "Amazon", "Zara", "Uber"}:
        text = text[0].lower() + text[1:]
    if closer and text[-1] not in ".?!":
        text += "." if closer.strip() not in {"??"} else ""
    text = opener + text + closer
    r = rng.random()
    if r < 0.12:
        text = text.lower()
    elif r < 0.25:
        for right, wrong in rng.sample(TYPOS, len(TYPOS)):
            if re.search(rf"\b{right}\b", text):
                text = re.sub(rf"\b{right}\b", wrong, text, count=1)
                break
    return text


def build() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (queries, golden) as lists of (text, reference); raises AssertionError when the
    phrase lists cannot give PER_INTENT distinct queries or overlap the golden set."""
    golden = [(t, intent) for intent, texts in GOLDEN.items() for t in texts]
    taken = {normalise(t) for t, _ in golden}
    rows: list[tuple[str, str]] = []
    for k, (intent, templates) in enumerate(TEMPLATES.items()):
        rng = random.Random(1000 + k)
        chosen: list[str] = []
        # Every template at least once plain-filled, then decorated variants until PER_INTENT.
        for tpl in templates:
            text = _fill(tpl, rng)
            if normalise(text) not in taken:
                taken.add(normalise(text))
                chosen.append(text)
        attempts = 0
        while len(chosen) < PER_INTENT:
            attempts += 1
            assert attempts < 10_000, f"{intent}: cannot make {PER_INTENT} distinct queries"
            text = _decorate(_fill(rng.choice(templates), rng), rng)
            if normalise(text) not in taken:
                taken.add(normalise(text))
                chosen.append(text)
        rows.extend((t, intent) for t in chosen)
    random.Random(7).shuffle(rows)
    return rows, golden


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["text", "reference"])
        w.writerows(rows)


def main() -> None:
    rows, golden = build()
    _write(HERE / "queries.csv", rows)
    _write(HERE / "golden.csv", golden)
    (HERE / "labels.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} queries and {len(golden)} golden queries for {len(TEMPLATES)} intents")


if __name__ == "__main__":
    main()
