using System.Text.Json;
using PaliGemma.CpuOnly.Model.Tasks;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tasks;

/// <summary>Every case of tests/golden/segmentation/parse_cases.json, field by field.</summary>
public sealed class OutputParserTests
{
    private static readonly Lazy<JsonDocument> s_cases = new(() =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(TestPaths.Golden, "segmentation", "parse_cases.json"))));

    private static JsonElement Case(string name) =>
        s_cases.Value.RootElement.GetProperty("cases").EnumerateArray().Single(c => c.GetProperty("name").GetString() == name);

    public static TheoryData<string> CaseNames()
    {
        var data = new TheoryData<string>();
        foreach (var c in s_cases.Value.RootElement.GetProperty("cases").EnumerateArray()) data.Add(c.GetProperty("name").GetString()!);
        return data;
    }

    [Fact]
    public void The_golden_file_holds_all_31_cases() => Assert.Equal(31, CaseNames().Count);

    [Theory]
    [MemberData(nameof(CaseNames))]
    public void Parse_returns_the_expected_objects(string name)
    {
        var c = Case(name);
        int width = c.GetProperty("image_width").GetInt32(), height = c.GetProperty("image_height").GetInt32();
        var objects = OutputParser.Parse(c.GetProperty("text").GetString()!, width, height);
        var expected = c.GetProperty("expected").EnumerateArray().ToArray();
        Assert.Equal(expected.Length, objects.Count);
        for (int i = 0; i < expected.Length; i++)
        {
            var e = expected[i];
            var o = objects[i];
            Assert.Equal(e.GetProperty("label").GetString(), o.Label);
            Assert.Equal(Ints(e.GetProperty("loc_y1x1y2x2")), o.LocY1X1Y2X2);
            AssertClose(e.GetProperty("normalized_y1x1y2x2"), o.NormalizedY1X1Y2X2);
            AssertClose(e.GetProperty("normalized_y1x1y2x2_div1024"), o.NormalizedY1X1Y2X2Div1024);
            AssertClose(e.GetProperty("box_xyxy"), o.BoxXyxy);
            AssertClose(e.GetProperty("box_xyxy_div1024"), o.BoxXyxyDiv1024);
            Assert.Equal(width, o.ImageWidth);
            Assert.Equal(height, o.ImageHeight);
            var seg = e.GetProperty("seg");
            if (seg.ValueKind == JsonValueKind.Null)
            {
                Assert.Null(o.Seg);
                Assert.Equal("detect", e.GetProperty("kind").GetString());
            }
            else
            {
                Assert.Equal(Ints(seg), o.Seg);
                Assert.Equal("segment", e.GetProperty("kind").GetString());
                var box = o.MaskPixelBox;
                Assert.NotNull(box);
                Assert.Equal(Ints(e.GetProperty("mask_pixel_box_x1y1x2y2")), new[] { box.Value.X1, box.Value.Y1, box.Value.X2, box.Value.Y2 });
            }
            Assert.Null(o.Mask);
        }
    }

    [Fact]
    public void Mask_pixel_box_truncates_the_double_product_like_big_vision()
    {
        // (87 / 1023.0) * 341 = 28.999999999999996 -> 28; 87 * 341 / 1023 would give 29.
        var o = Assert.Single(OutputParser.Parse("<loc0000><loc0087><loc1023><loc1023>", 341, 341));
        Assert.Equal(28, o.MaskPixelBox!.Value.X1);
        Assert.Equal(341, o.MaskPixelBox!.Value.X2);
    }

    [Fact]
    public void A_box_that_collapses_after_truncation_has_no_mask_box()
    {
        var o = Assert.Single(OutputParser.Parse("<loc0000><loc0100><loc1023><loc0101> thin", 10, 10));
        Assert.Null(o.MaskPixelBox);
    }

    [Fact]
    public void Parse_never_throws_on_random_fragments()
    {
        string[] pieces = ["<loc0261>", "<loc1023>", "<loc1024>", "<seg012>", "<seg128>", "<loc00", "<seg", " ", ";", "cat", "<", ">", "\n", "<eos>", "猫", "<loc", "0123>"];
        var random = new Random(1234);
        for (int trial = 0; trial < 2000; trial++)
        {
            var text = string.Concat(Enumerable.Range(0, random.Next(40)).Select(_ => pieces[random.Next(pieces.Length)]));
            var objects = OutputParser.Parse(text, 1 + random.Next(500), 1 + random.Next(500));
            foreach (var o in objects)
            {
                Assert.Equal(4, o.LocY1X1Y2X2.Count);
                Assert.True(o.LocY1X1Y2X2[2] > o.LocY1X1Y2X2[0] && o.LocY1X1Y2X2[3] > o.LocY1X1Y2X2[1]);
                Assert.True(o.Seg is null || (o.Seg.Count == 16 && o.Seg.All(s => s is >= 0 and <= 127)));
                Assert.DoesNotContain(';', o.Label);
            }
        }
    }

    [Theory]
    [InlineData(0, 10)]
    [InlineData(10, -1)]
    public void Parse_rejects_a_non_positive_image_size(int width, int height) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => OutputParser.Parse("<loc0000><loc0000><loc1023><loc1023>", width, height));

    private static int[] Ints(JsonElement array) => array.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    private static void AssertClose(JsonElement expected, double[] actual)
    {
        var e = expected.EnumerateArray().Select(x => x.GetDouble()).ToArray();
        Assert.Equal(e.Length, actual.Length);
        for (int i = 0; i < e.Length; i++)
            Assert.True(Math.Abs(e[i] - actual[i]) <= 1e-9, $"element {i}: expected {e[i]:R}, got {actual[i]:R}");
    }
}
