"""The text an int8 KV cache's scales are measured on (targets/onnx/lean.py: kv_scales).

Every lean graph of one model with int8 KV buffers gets the same scales, measured on this text by
the model as loaded (the full model, before a bundle's experts are installed): a bundle's graph and
the full model's graph then share their buffers (the full graph prefills, the experts' graph
decodes), and any bundle of the model can be swapped into any of them. Written for this project:
prose, dialogue, figures, a list and a little code, so the keys and values it produces are the
ones ordinary prompts produce.
"""

CALIBRATION_TEXT = """\
The council met on Tuesday evening to discuss the plan for the old railway station, which has stood
empty since the line closed in 1987. About two hundred residents filled the hall, and many more
followed the meeting online. The proposal, put forward by a local housing association, would turn the
main building into a library and a small market, and build 48 flats on the land behind it.

"We have waited thirty years for somebody to do something with it," said one resident, who has lived
on the street opposite the station since she was a child. "I don't mind what it becomes, as long as it
stops falling apart." Others were less sure. A group of shop owners said the market would draw trade
away from the high street, where eleven units are already empty, and asked the council to publish the
figures behind the association's forecast of 1,200 visitors a week.

The council's planning officer told the meeting that the building is listed, so its front and its
clock tower must be kept, and that the cost of the repairs alone was estimated at £3.4m. The
association has applied for a heritage grant to cover about half of that. A decision on the planning
application is expected in March; if it is approved, work could begin in the autumn and take two years.

Elsewhere, scientists studying a colony of seabirds on a remote island report that the number of
breeding pairs fell by a fifth between 2015 and 2023. They think a shortage of sand eels, the small
fish the birds feed to their chicks, is the main cause, and that warmer seas have pushed the fish
further north. "The adults can fly a long way to find food, but the chicks cannot wait," the lead
author explained. The team counted nests from the cliffs each June and fitted small trackers to
forty birds to follow where they went to feed.

Q: How do I keep a list of numbers sorted as I add to it?
A: Insert each number where it belongs instead of sorting the whole list every time. In Python the
bisect module does this for you:

    import bisect

    def add(values, x):
        bisect.insort(values, x)
        return values

    print(add([1, 4, 9], 5))  # [1, 4, 5, 9]

Each insertion takes O(log n) comparisons to find the place, though moving the later items along
still takes O(n) time. For millions of values, a heap or a balanced tree may suit you better.

Things to bring on the walk: water (at least one litre each), a map, a warm layer, sun cream, and
something to eat at the top. The path is steep after the second gate, and the weather can change
quickly, so set off early, tell someone where you are going, and turn back if the cloud comes down.

Dear Sam, thank you for your letter and for the photographs of the garden, which made us all smile.
The roses look wonderful this year. We are well here, although the roof still leaks when the wind
blows from the west, and the builder says he cannot come until the end of next month. Write soon.
"""
